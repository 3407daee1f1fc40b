//! The connection budget: how many connections the source may hold to the Consul agent,
//! how many services that lets it long-poll, and how the rest are watched.
//!
//! Consul's agent accepts at most `limits.http_max_conns_per_client` connections from one
//! client address (200 by default) and resets the others. Consul 1.8 also keeps a
//! blocking query's connection open until the query returns, even after the client has
//! gone: a connector restarted from the same address (a container restart keeps the
//! pod's IP) finds its predecessor's long polls still counted for up to the blocking
//! wait. So, when the budget is derived from the agent's limit, it is **half** of it (less
//! a reserve for the operator's own `consul` commands): a successor always fits beside the
//! leftovers of the process it replaces.
//!
//! Over HTTP/2 (Consul's HTTPS API negotiates `h2`) one connection carries many
//! concurrent blocking queries, up to the server's stream limit (Go's default: 250), so
//! the budget buys [`STREAMS_PER_CONNECTION`] long polls per connection: 10,000 services
//! fit in 50 connections. Over HTTP/1.1 every long poll holds a connection of its own,
//! so beyond the budget the source switches to the shared mode (see
//! [`WatchMode::Shared`]).
//!
//! Pure arithmetic, unit-tested; the source reads the agent's limit and the negotiated
//! protocol and hands them here.

use std::fmt;

/// Long polls per HTTP/2 connection by default: below Go's default
/// `MaxConcurrentStreams` (250), so that the plain reads sharing a connection never queue
/// behind blocking queries. A proxy in front of the agent may allow fewer (nginx and AWS
/// load balancers: 128, HAProxy: 100): requests beyond the limit wait in the client, for
/// minutes behind blocking queries, so `--consul-http2-streams` must stay below it.
pub const STREAMS_PER_CONNECTION: usize = 200;

/// Consul's default `limits.http_max_conns_per_client`, assumed when the agent does not
/// say (its `/v1/agent/self` needs `agent:read`).
pub const CONSUL_DEFAULT_CONNS_PER_CLIENT: usize = 200;

/// Connections left to the operator's own tools from the same address.
const OPERATOR_RESERVE: usize = 4;

/// The HTTP/1.1 budget when the agent has no per-client limit: every connection is also
/// a descriptor here and a goroutine in the agent, and beyond a few thousand the
/// catalog-wide watches of the shared mode are cheaper than more connections.
const HTTP1_UNLIMITED_CAP: usize = 4096;

/// Plain reads (first snapshot, re-reads of changed services) in flight at once once the
/// watches run.
const STEADY_READS: usize = 8;

/// The catalog-wide blocking queries: the service list and the health-check state.
const CATALOG_WATCHES: usize = 2;

/// Smallest `--consul-max-connections` that works: the reads, the two catalog-wide
/// watches and a few long polls.
pub const MIN_CONNECTIONS: usize = 8;

/// How the connection to Consul carries requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1: one request at a time per connection.
    Http1,
    /// HTTP/2 (negotiated over TLS): many concurrent requests per connection.
    Http2,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::Http2 => "h2",
        }
    }
}

/// What the operator set with `--consul-max-connections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaxConnections {
    /// Half of the agent's per-client limit (see the module documentation).
    #[default]
    Auto,
    /// No limit (`0`).
    Unlimited,
    /// Exactly this many connections in all.
    Fixed(usize),
}

impl MaxConnections {
    /// The flag's value: unset is automatic, 0 is unlimited.
    pub fn from_flag(value: Option<usize>) -> Self {
        match value {
            None => Self::Auto,
            Some(0) => Self::Unlimited,
            Some(n) => Self::Fixed(n),
        }
    }
}

/// How the source watches its services at a given moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WatchMode {
    /// Every service has its own blocking query, multiplexed over HTTP/2: a change is
    /// seen at once and costs one request.
    Multiplexed,
    /// Every service has its own blocking query on its own HTTP/1.1 connection.
    PerService,
    /// More services than long polls: the budget's long polls go to the services the
    /// catalog-wide watches cannot see well (instances without checks first); the others
    /// are watched through `/v1/health/state/any` (any check change, named by service)
    /// and `/v1/catalog/services` (services and tags), and re-read only when named, plus
    /// a slow background sweep. Degraded: a change costs one catalog-wide answer and one
    /// read, and a change that moves no check (an address re-registered with the same
    /// checks) waits for the sweep.
    Shared,
}

impl WatchMode {
    pub const ALL: [WatchMode; 3] = [Self::Multiplexed, Self::PerService, Self::Shared];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Multiplexed => "multiplexed",
            Self::PerService => "per_service",
            Self::Shared => "shared",
        }
    }

    /// Whether some services lack a blocking query of their own.
    pub fn is_degraded(self) -> bool {
        self == Self::Shared
    }
}

impl fmt::Display for WatchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The budget, computed once the transport and the agent's limit are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub transport: Transport,
    /// Connections this process may hold in all (`usize::MAX`: no limit).
    pub connections: usize,
    /// Services that may have a blocking query of their own (`usize::MAX`: all).
    pub long_polls: usize,
    /// Connections the long polls may use (HTTP/2: each carries
    /// [`STREAMS_PER_CONNECTION`]; HTTP/1.1: one each).
    pub poll_connections: usize,
    /// Plain reads in flight at once after the first snapshot.
    pub reads: usize,
    /// Plain reads in flight at once during the first snapshot (nothing else is open).
    pub snapshot_reads: usize,
    /// Long polls per HTTP/2 connection.
    pub streams: usize,
}

impl Plan {
    /// The budget for `transport`, the agent's per-client limit (`None`: unknown, `Some(0)`:
    /// none) and the operator's setting; `snapshot_concurrency` is the configured number
    /// of reads in flight during the first snapshot.
    pub fn new(
        transport: Transport,
        agent_limit: Option<usize>,
        configured: MaxConnections,
        snapshot_concurrency: usize,
    ) -> Self {
        Self::with_streams(
            transport,
            agent_limit,
            configured,
            snapshot_concurrency,
            STREAMS_PER_CONNECTION,
        )
    }

    /// As [`Plan::new`] with `streams` long polls per HTTP/2 connection.
    pub fn with_streams(
        transport: Transport,
        agent_limit: Option<usize>,
        configured: MaxConnections,
        snapshot_concurrency: usize,
        streams: usize,
    ) -> Self {
        let streams = streams.max(1);
        let connections = match configured {
            MaxConnections::Fixed(n) => n.max(1),
            MaxConnections::Unlimited => usize::MAX,
            MaxConnections::Auto => match agent_limit.unwrap_or(CONSUL_DEFAULT_CONNS_PER_CLIENT) {
                0 => match transport {
                    Transport::Http1 => HTTP1_UNLIMITED_CAP,
                    Transport::Http2 => usize::MAX,
                },
                limit => (limit / 2).saturating_sub(OPERATOR_RESERVE).max(1),
            },
        };
        let snapshot_concurrency = snapshot_concurrency.max(1);
        if connections == usize::MAX {
            return Self {
                transport,
                connections,
                long_polls: usize::MAX,
                poll_connections: usize::MAX,
                reads: STEADY_READS.min(snapshot_concurrency),
                snapshot_reads: snapshot_concurrency,
                streams,
            };
        }
        match transport {
            Transport::Http2 => {
                // Reads and the catalog-wide watches share one connection; the rest
                // carry long polls.
                let poll_connections = connections.saturating_sub(1);
                Self {
                    transport,
                    connections,
                    long_polls: poll_connections.saturating_mul(streams),
                    poll_connections,
                    reads: STEADY_READS.min(snapshot_concurrency),
                    snapshot_reads: snapshot_concurrency,
                    streams,
                }
            }
            Transport::Http1 => {
                // The pool bounds requests, not sockets: a connection handed back just as
                // another request starts lets that request open a new one, and the pool
                // keeps both. Each lane gets twice its requests in the budget.
                let reads = (connections / 16).clamp(1, STEADY_READS);
                let watches = CATALOG_WATCHES.min(connections.saturating_sub(2 * reads) / 2);
                let long_polls = connections.saturating_sub(2 * reads + 2 * watches);
                Self {
                    transport,
                    connections,
                    long_polls,
                    poll_connections: long_polls,
                    reads,
                    // During the snapshot neither long polls nor the watches are open.
                    snapshot_reads: snapshot_concurrency
                        .min(connections.saturating_sub(2 * watches) / 2)
                        .max(1),
                    streams,
                }
            }
        }
    }

    /// The mode for `services` selected services.
    pub fn mode(&self, services: usize) -> WatchMode {
        if services > self.long_polls {
            WatchMode::Shared
        } else {
            match self.transport {
                Transport::Http2 => WatchMode::Multiplexed,
                Transport::Http1 => WatchMode::PerService,
            }
        }
    }

    /// Long polls per connection of the poll lane.
    pub fn streams_per_connection(&self) -> usize {
        match self.transport {
            Transport::Http2 => self.streams,
            Transport::Http1 => 1,
        }
    }

    /// Descriptors needed for `services` services at most (for the open-file warning).
    pub fn descriptors_for(&self, services: usize) -> usize {
        let polls = services.min(self.long_polls);
        let poll_conns = polls.div_ceil(self.streams_per_connection());
        poll_conns.saturating_add(2 * (self.reads + CATALOG_WATCHES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_half_the_agents_limit_so_a_successor_fits() {
        let p = Plan::new(Transport::Http1, Some(200), MaxConnections::Auto, 32);
        assert_eq!(p.connections, 96);
        assert_eq!(p.reads, 6);
        // 96 - 2 × 6 reads - 2 × 2 watches.
        assert_eq!(p.long_polls, 80);
        assert_eq!(p.snapshot_reads, 32);
        // Two such processes and the operator's reserve stay under the agent's limit.
        assert!(2 * p.connections + 2 * OPERATOR_RESERVE <= 200);
        // Unknown limit: Consul's default.
        assert_eq!(
            Plan::new(Transport::Http1, None, MaxConnections::Auto, 32),
            p
        );
    }

    #[test]
    fn http2_carries_many_long_polls_per_connection() {
        let p = Plan::new(Transport::Http2, Some(200), MaxConnections::Auto, 32);
        assert_eq!(p.connections, 96);
        assert_eq!(p.poll_connections, 95);
        assert_eq!(p.long_polls, 95 * STREAMS_PER_CONNECTION);
        assert_eq!(p.mode(10_000), WatchMode::Multiplexed);
        assert_eq!(p.mode(30_000), WatchMode::Shared);
        assert_eq!(p.descriptors_for(10_000), 50 + 2 * (8 + 2));
    }

    #[test]
    fn fewer_streams_behind_a_proxy() {
        let p = Plan::with_streams(Transport::Http2, Some(200), MaxConnections::Auto, 32, 100);
        assert_eq!(p.long_polls, 95 * 100);
        assert_eq!(p.streams_per_connection(), 100);
        assert_eq!(p.descriptors_for(9_000), 90 + 2 * (8 + 2));
        assert_eq!(p.mode(10_000), WatchMode::Shared);
    }

    #[test]
    fn modes_follow_the_number_of_services() {
        let p = Plan::new(Transport::Http1, Some(200), MaxConnections::Auto, 32);
        assert_eq!(p.mode(80), WatchMode::PerService);
        assert_eq!(p.mode(81), WatchMode::Shared);
        assert!(WatchMode::Shared.is_degraded());
        assert!(!WatchMode::Multiplexed.is_degraded());
    }

    #[test]
    fn unlimited_settings() {
        let p = Plan::new(Transport::Http1, Some(200), MaxConnections::Unlimited, 32);
        assert_eq!(p.long_polls, usize::MAX);
        assert_eq!(p.mode(50_000), WatchMode::PerService);
        // An agent without a limit: HTTP/1.1 stays bounded, HTTP/2 does not need to be.
        let p = Plan::new(Transport::Http1, Some(0), MaxConnections::Auto, 32);
        assert_eq!(p.connections, HTTP1_UNLIMITED_CAP);
        let p = Plan::new(Transport::Http2, Some(0), MaxConnections::Auto, 32);
        assert_eq!(p.mode(1_000_000), WatchMode::Multiplexed);
    }

    #[test]
    fn the_smallest_budget_still_works() {
        let p = Plan::new(
            Transport::Http1,
            None,
            MaxConnections::Fixed(MIN_CONNECTIONS),
            32,
        );
        assert_eq!(p.reads, 1);
        assert_eq!(p.long_polls, 2);
        assert_eq!(p.snapshot_reads, 2);
        assert_eq!(p.mode(3), WatchMode::Shared);
        // Never more sockets than the budget, counting each lane twice.
        assert!(2 * p.reads + 2 * CATALOG_WATCHES + p.long_polls <= MIN_CONNECTIONS);
        assert_eq!(
            MaxConnections::from_flag(Some(0)),
            MaxConnections::Unlimited
        );
        assert_eq!(MaxConnections::from_flag(None), MaxConnections::Auto);
        assert_eq!(MaxConnections::from_flag(Some(7)), MaxConnections::Fixed(7));
    }

    #[test]
    fn a_large_agent_limit_grows_the_budget() {
        let p = Plan::new(Transport::Http1, Some(12_000), MaxConnections::Auto, 32);
        assert_eq!(p.connections, 5_996);
        assert_eq!(p.mode(5_000), WatchMode::PerService);
    }
}
