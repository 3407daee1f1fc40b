#![forbid(unsafe_code)]

fn main() {
    println!("registry-connector {}", env!("CARGO_PKG_VERSION"));
}
