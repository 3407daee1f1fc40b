package io.flomesh.registryconnector.testenv;

import java.io.IOException;
import java.io.InputStream;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.regex.Pattern;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.ExponentialBackoffRetry;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.UriSpec;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;
import org.apache.dubbo.config.ApplicationConfig;
import org.apache.dubbo.config.ProtocolConfig;
import org.apache.dubbo.config.RegistryConfig;
import org.apache.dubbo.config.ServiceConfig;
import org.apache.dubbo.config.bootstrap.DubboBootstrap;
import org.apache.dubbo.rpc.service.GenericException;
import org.apache.dubbo.rpc.service.GenericService;
import org.springframework.cloud.zookeeper.discovery.ZookeeperInstance;

/**
 * Registers services in ZooKeeper the way applications do, through their own libraries,
 * and stays connected until it is killed: the instance nodes are ephemeral and live as
 * long as its sessions (Dubbo also leaves the persistent nodes a Dubbo application leaves:
 * the /dubbo/INTERFACE/{providers,configurators} parents, /dubbo/mapping/INTERFACE and
 * /dubbo/config/...).
 *
 * <pre>
 * usage: ZookeeperRegister [--until-stdin-closes] [--session-timeout MS] ZK_CONNECT SPEC...
 *   SPEC = dubbo|APPLICATION|INTERFACE|VERSION|GROUP|HOST|PORT[|PROTOCOL[|KEY=VALUE,...]]
 *        | curator|NAME|ID|HOST|PORT[|KEY=VALUE,...]
 * </pre>
 *
 * <ul>
 *   <li>{@code dubbo}: an Apache Dubbo 3 provider of INTERFACE (a generic service: no Java
 *       interface needed; VERSION and GROUP may be empty) in application APPLICATION,
 *       registered at HOST:PORT over PROTOCOL ({@code dubbo} by default, or {@code tri}),
 *       with KEY=VALUE as service parameters in its URL (weight=0, ...). Dubbo's default
 *       register mode writes both layouts: /dubbo/INTERFACE/providers/URL-encoded URL and
 *       the application's instance under /services/APPLICATION/ (Curator's layout, Dubbo's
 *       payload); with Dubbo's defaults the same ZooKeeper is also its metadata report
 *       (/dubbo/mapping/INTERFACE: the application names; with Dubbo's default local
 *       metadata nothing under /dubbo/metadata) and config center (/dubbo/config/...). The specs of one
 *       APPLICATION are one Dubbo application; each APPLICATION is its own Dubbo
 *       application (DubboBootstrap) in this JVM, with its own ZooKeeper session.
 *   <li>{@code curator}: a Curator service-discovery instance /services/NAME/ID (as Spring
 *       Cloud Zookeeper registers: uriSpec {scheme}://{address}:{port} and a payload of
 *       class org.springframework.cloud.zookeeper.discovery.ZookeeperInstance with id ID,
 *       name NAME and KEY=VALUE as its metadata).
 * </ul>
 *
 * ('|' separates the fields, so IPv6 HOSTs need no brackets.) HOST must be an IP literal,
 * and test data uses documentation addresses only: nothing here ever contacts HOST. Dubbo's
 * servers listen on free ports of 127.0.0.1 ({@link LoopbackBind}), its QoS server is off.
 * Prints one "registered ..." line per SPEC, then "ready N" once all N are in ZooKeeper
 * (checked by reading the nodes back). On SIGTERM (or, with --until-stdin-closes, when
 * standard input reaches end of file) Dubbo and Curator close their sessions, which
 * removes their nodes at once; after SIGKILL ZooKeeper removes them when the sessions
 * expire: Dubbo and Curator ask for 60 s, which the server caps at its maxSessionTimeout
 * (20 ticks: 40 s in the test environment). --session-timeout MS asks for MS instead, for
 * the Curator instances and Dubbo's application-level instances; Dubbo's /dubbo/... nodes
 * keep Dubbo's 60 s (Dubbo does not pass the setting on to that client).
 */
public class ZookeeperRegister {
    private static final String USAGE = "usage: ZookeeperRegister [--until-stdin-closes] [--session-timeout MS] "
            + "ZK_CONNECT 'dubbo|APPLICATION|INTERFACE|VERSION|GROUP|HOST|PORT[|PROTOCOL[|KEY=VALUE,...]]'... "
            + "'curator|NAME|ID|HOST|PORT[|KEY=VALUE,...]'...";
    private static final Pattern IP_LITERAL = Pattern.compile("[0-9A-Fa-f:.]+");
    private static final long CHECK_TIMEOUT_MS = 60_000;

    record DubboSpec(String application, String iface, String version, String group, String host, int port,
            String protocol, Map<String, String> params) {
        /** The host as Dubbo writes it in a URL. */
        String urlHost() {
            return host.contains(":") ? "[" + host + "]" : host;
        }
    }

    record CuratorSpec(String name, String id, String host, int port, Map<String, String> metadata) {
    }

    public static void main(String[] args) {
        try {
            run(args);
        } catch (Throwable t) {
            // Dubbo's and Curator's non-daemon threads would keep a failed JVM alive.
            t.printStackTrace();
            fail("failed: " + t);
        }
    }

    private static void run(String[] args) throws Exception {
        boolean untilStdinCloses = false;
        Integer sessionTimeoutMs = null;
        int i = 0;
        for (; i < args.length && args[i].startsWith("--"); i++) {
            switch (args[i]) {
                case "--until-stdin-closes" -> untilStdinCloses = true;
                case "--session-timeout" -> {
                    if (i + 1 >= args.length) {
                        usage("--session-timeout needs milliseconds");
                    }
                    sessionTimeoutMs = Integer.valueOf(args[++i]);
                }
                default -> usage("unknown option " + args[i]);
            }
        }
        if (args.length - i < 2) {
            usage("a ZooKeeper address and at least one SPEC are required");
        }
        String zk = args[i++];

        List<DubboSpec> dubbo = new ArrayList<>();
        List<CuratorSpec> curator = new ArrayList<>();
        for (; i < args.length; i++) {
            String[] f = args[i].split("\\|", -1);
            switch (f[0]) {
                case "dubbo" -> {
                    if (f.length < 7 || f.length > 9) {
                        usage("not dubbo|APPLICATION|INTERFACE|VERSION|GROUP|HOST|PORT[|PROTOCOL[|KEY=VALUE,...]]: "
                                + args[i]);
                    }
                    String protocol = f.length > 7 && !f[7].isEmpty() ? f[7] : "dubbo";
                    if (!protocol.equals("dubbo") && !protocol.equals("tri")) {
                        usage("PROTOCOL is dubbo or tri, not " + protocol);
                    }
                    if (f[1].isEmpty() || f[2].isEmpty()) {
                        usage("APPLICATION and INTERFACE must not be empty: " + args[i]);
                    }
                    dubbo.add(new DubboSpec(f[1], f[2], f[3], f[4], host(f[5]), port(f[6]), protocol,
                            keyValues(f.length > 8 ? f[8] : "")));
                }
                case "curator" -> {
                    if (f.length < 5 || f.length > 6) {
                        usage("not curator|NAME|ID|HOST|PORT[|KEY=VALUE,...]: " + args[i]);
                    }
                    if (f[1].isEmpty() || f[2].isEmpty()) {
                        usage("NAME and ID must not be empty: " + args[i]);
                    }
                    curator.add(new CuratorSpec(f[1], f[2], host(f[3]), port(f[4]),
                            keyValues(f.length > 5 ? f[5] : "")));
                }
                default -> usage("a SPEC starts with dubbo| or curator|: " + args[i]);
            }
        }

        // One Curator client for the Curator instances, and to read Dubbo's nodes back.
        CuratorFrameworkFactory.Builder builder = CuratorFrameworkFactory.builder()
                .connectString(zk)
                .connectionTimeoutMs(sessionTimeoutMs == null ? 15_000 : Math.min(15_000, sessionTimeoutMs))
                .retryPolicy(new ExponentialBackoffRetry(500, 10));
        if (sessionTimeoutMs != null) {
            builder.sessionTimeoutMs(sessionTimeoutMs);
        }
        CuratorFramework client = builder.build();
        client.start();
        if (!client.blockUntilConnected(30, TimeUnit.SECONDS)) {
            fail("no ZooKeeper session with " + zk + " within 30 s");
        }

        List<String> lines = new ArrayList<>();
        ServiceDiscovery<ZookeeperInstance> discovery = null;
        if (!curator.isEmpty()) {
            // As Spring Cloud Zookeeper builds its ServiceDiscovery: root /services, JSON.
            discovery = ServiceDiscoveryBuilder.builder(ZookeeperInstance.class)
                    .client(client)
                    .basePath("/services")
                    .serializer(new JsonInstanceSerializer<>(ZookeeperInstance.class))
                    .build();
            discovery.start();
            for (CuratorSpec s : curator) {
                discovery.registerService(ServiceInstance.<ZookeeperInstance>builder()
                        .name(s.name())
                        .id(s.id())
                        .address(s.host())
                        .port(s.port())
                        .uriSpec(new UriSpec("{scheme}://{address}:{port}"))
                        .payload(new ZookeeperInstance(s.id(), s.name(), s.metadata()))
                        .build());
                lines.add("registered curator /services/" + s.name() + "/" + s.id() + " " + hostPort(s.host(), s.port()));
            }
        }
        ServiceDiscovery<ZookeeperInstance> registered = discovery;
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            // Dubbo closes its own applications in its shutdown hook (unregistering, then
            // closing its ZooKeeper clients); this closes the Curator side.
            try {
                if (registered != null) {
                    registered.close();
                }
            } catch (IOException | RuntimeException ignored) {
                // Closing the client below ends the session anyway.
            }
            client.close();
        }, "zookeeper-register-close"));

        if (!dubbo.isEmpty()) {
            startDubbo(zk, sessionTimeoutMs, dubbo);
            for (DubboSpec s : dubbo) {
                awaitProvider(client, s);
                Integer bound = LoopbackBind.boundPort(s.protocol(), s.host(), s.port());
                lines.add("registered dubbo " + s.application() + " " + s.iface() + " version=" + s.version()
                        + " group=" + s.group() + " " + s.protocol() + "://" + s.urlHost() + ":" + s.port()
                        + " (listening on 127.0.0.1:" + bound + ")");
            }
            for (String app : applications(dubbo).keySet()) {
                awaitChildren(client, "/services/" + app, "Dubbo's instance of application " + app);
            }
        }
        for (String line : lines) {
            System.out.println(line);
        }
        System.out.println("ready " + (dubbo.size() + curator.size()));
        System.out.flush();

        if (untilStdinCloses) {
            Thread watcher = new Thread(() -> {
                try {
                    InputStream in = System.in;
                    while (in.read() >= 0) {
                        // Whatever the parent writes is ignored; only end of file counts.
                    }
                } catch (IOException ignored) {
                    // Treated like end of file.
                }
                System.exit(0);
            }, "stdin-watcher");
            watcher.setDaemon(true);
            watcher.start();
        }
        new CountDownLatch(1).await();
    }

    private static Map<String, List<DubboSpec>> applications(List<DubboSpec> specs) {
        Map<String, List<DubboSpec>> apps = new LinkedHashMap<>();
        for (DubboSpec s : specs) {
            apps.computeIfAbsent(s.application(), k -> new ArrayList<>()).add(s);
        }
        return apps;
    }

    /** One Dubbo application per APPLICATION, started one after the other. */
    private static void startDubbo(String zk, Integer sessionTimeoutMs, List<DubboSpec> specs) {
        GenericService ref = new GenericService() {
            @Override
            public Object $invoke(String method, String[] parameterTypes, Object[] args) throws GenericException {
                throw new GenericException("ZookeeperRegister", "a test fixture serves no calls");
            }
        };
        for (Map.Entry<String, List<DubboSpec>> app : applications(specs).entrySet()) {
            DubboBootstrap bootstrap = DubboBootstrap.newInstance();

            ApplicationConfig application = new ApplicationConfig(app.getKey());
            application.setQosEnable(false);
            application.setQosAcceptForeignIp(false);
            bootstrap.application(application);

            // Registry, and with Dubbo's defaults also metadata report and config center.
            // Dubbo 3.3 honours the registry's session timeout for the ZooKeeper client of
            // its application-level discovery (/services/...) only: the client that its
            // registry, config center and metadata report share (/dubbo/...) is built
            // from the address and connect timeout alone, with Dubbo's 60 s session.
            RegistryConfig registry = new RegistryConfig("zookeeper://" + zk);
            if (sessionTimeoutMs != null) {
                registry.setSession(sessionTimeoutMs);
            }
            bootstrap.registry(registry);

            Map<String, ProtocolConfig> protocols = new LinkedHashMap<>();
            for (DubboSpec s : app.getValue()) {
                ProtocolConfig protocol = protocols.computeIfAbsent(s.protocol() + "|" + s.host() + "|" + s.port(), k -> {
                    ProtocolConfig p = new ProtocolConfig(s.protocol(), s.port());
                    p.setId(s.protocol() + "-" + protocols.size());
                    // Dubbo's form of an IPv6 host (it checks unbracketed ones as names).
                    p.setHost(s.urlHost());
                    bootstrap.protocol(p);
                    return p;
                });
                ServiceConfig<GenericService> service = new ServiceConfig<>();
                service.setInterface(s.iface());
                service.setGeneric("true");
                service.setRef(ref);
                if (!s.version().isEmpty()) {
                    service.setVersion(s.version());
                }
                if (!s.group().isEmpty()) {
                    service.setGroup(s.group());
                }
                if (!s.params().isEmpty()) {
                    service.setParameters(new LinkedHashMap<>(s.params()));
                }
                service.setProtocol(protocol);
                bootstrap.service(service);
            }
            bootstrap.start();
        }
    }

    /** Waits for the spec's provider URL under /dubbo/INTERFACE/providers. */
    private static void awaitProvider(CuratorFramework client, DubboSpec s) throws Exception {
        String path = "/dubbo/" + s.iface() + "/providers";
        String prefix = s.protocol() + "://" + s.urlHost() + ":" + s.port() + "/";
        long deadline = System.currentTimeMillis() + CHECK_TIMEOUT_MS;
        while (true) {
            if (client.checkExists().forPath(path) != null) {
                for (String child : client.getChildren().forPath(path)) {
                    String url = URLDecoder.decode(child, StandardCharsets.UTF_8);
                    if (url.startsWith(prefix) && param(url, "version").equals(s.version())
                            && param(url, "group").equals(s.group())) {
                        return;
                    }
                }
            }
            if (System.currentTimeMillis() > deadline) {
                fail("Dubbo did not register " + prefix + s.iface() + " (version '" + s.version() + "', group '"
                        + s.group() + "') under " + path + " within " + CHECK_TIMEOUT_MS / 1000 + " s");
            }
            Thread.sleep(100);
        }
    }

    private static void awaitChildren(CuratorFramework client, String path, String what) throws Exception {
        long deadline = System.currentTimeMillis() + CHECK_TIMEOUT_MS;
        while (client.checkExists().forPath(path) == null || client.getChildren().forPath(path).isEmpty()) {
            if (System.currentTimeMillis() > deadline) {
                fail(what + " is not under " + path + " after " + CHECK_TIMEOUT_MS / 1000 + " s");
            }
            Thread.sleep(100);
        }
    }

    /** A URL's query parameter, "" when absent. */
    private static String param(String url, String key) {
        int q = url.indexOf('?');
        if (q < 0) {
            return "";
        }
        for (String kv : url.substring(q + 1).split("&")) {
            if (kv.startsWith(key + "=")) {
                return kv.substring(key.length() + 1);
            }
        }
        return "";
    }

    private static String host(String h) {
        if (h.startsWith("[") && h.endsWith("]")) {
            h = h.substring(1, h.length() - 1);
        }
        // An IP literal: nothing is resolved, and a name could not be a documentation address.
        if (!IP_LITERAL.matcher(h).matches()) {
            usage("HOST must be an IPv4 or IPv6 literal, not '" + h + "'");
        }
        return h;
    }

    private static int port(String p) {
        try {
            int port = Integer.parseInt(p);
            if (port > 0 && port < 65536) {
                return port;
            }
        } catch (NumberFormatException ignored) {
            // Reported below.
        }
        usage("not a port: '" + p + "'");
        return 0;
    }

    private static String hostPort(String host, int port) {
        return (host.contains(":") ? "[" + host + "]" : host) + ":" + port;
    }

    private static Map<String, String> keyValues(String field) {
        Map<String, String> map = new LinkedHashMap<>();
        if (field.isEmpty()) {
            return map;
        }
        for (String kv : field.split(",")) {
            int eq = kv.indexOf('=');
            if (eq <= 0) {
                usage("not KEY=VALUE: " + kv);
            }
            map.put(kv.substring(0, eq), kv.substring(eq + 1));
        }
        return map;
    }

    private static void fail(String why) {
        System.err.println("ZookeeperRegister: " + why);
        System.exit(1);
    }

    private static void usage(String why) {
        System.err.println("ZookeeperRegister: " + why);
        System.err.println(USAGE);
        System.exit(2);
    }
}
