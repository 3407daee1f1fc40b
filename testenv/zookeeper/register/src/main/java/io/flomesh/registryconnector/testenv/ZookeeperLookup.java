package io.flomesh.registryconnector.testenv;

import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.ExponentialBackoffRetry;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;
import org.apache.dubbo.common.URL;
import org.apache.dubbo.common.utils.UrlUtils;
import org.springframework.cloud.zookeeper.discovery.ZookeeperInstance;

/**
 * Reads services back the way their consumers do, through the consumers' own libraries:
 * what a Kubernetes → ZooKeeper connector wrote must be what a Dubbo consumer and a
 * Spring Cloud Zookeeper client find. Prints one line per provider or instance, then
 * "done"; never contacts the addresses it reads.
 *
 * <pre>
 * usage: ZookeeperLookup ZK_CONNECT dubbo BASE INTERFACE VERSION
 *        ZookeeperLookup ZK_CONNECT curator BASE NAME
 * </pre>
 *
 * <ul>
 *   <li>{@code dubbo}: every node below BASE/INTERFACE/providers parsed by Dubbo's own
 *       {@code URL.valueOf(URL.decode(name))}, as its registry does, and matched by Dubbo's
 *       {@code UrlUtils.isMatch} against a consumer of INTERFACE at VERSION (empty: none):
 *       {@code provider PROTOCOL HOST PORT enabled=BOOL match=BOOL}. {@code enabled} is
 *       the rule of Dubbo's RegistryDirectory when it builds invokers: {@code disabled}
 *       when present, else {@code enabled} (default true).
 *   <li>{@code curator}: Curator's {@code ServiceDiscovery.queryForInstances(NAME)} with
 *       Spring Cloud Zookeeper's payload class, as its DiscoveryClient asks:
 *       {@code instance ADDRESS PORT status=INSTANCE_STATUS uri=URI}.
 * </ul>
 */
public class ZookeeperLookup {
    public static void main(String[] args) throws Exception {
        if (args.length < 4) {
            System.err.println("usage: ZookeeperLookup ZK_CONNECT dubbo BASE INTERFACE VERSION | ZK_CONNECT curator BASE NAME");
            System.exit(2);
        }
        String connect = args[0], mode = args[1], base = args[2], name = args[3];
        try (CuratorFramework client = CuratorFrameworkFactory.newClient(connect, new ExponentialBackoffRetry(200, 5))) {
            client.start();
            if (!client.blockUntilConnected(30, TimeUnit.SECONDS)) {
                throw new IllegalStateException("no ZooKeeper connection to " + connect);
            }
            switch (mode) {
                case "dubbo":
                    dubbo(client, base, name, args.length > 4 ? args[4] : "");
                    break;
                case "curator":
                    curator(client, base, name);
                    break;
                default:
                    throw new IllegalArgumentException("mode must be dubbo or curator, not " + mode);
            }
        }
        System.out.println("done");
    }

    private static void dubbo(CuratorFramework client, String base, String iface, String version) throws Exception {
        URL consumer = URL.valueOf("consumer://127.0.0.1/" + iface + "?interface=" + iface
                + "&category=providers&side=consumer" + (version.isEmpty() ? "" : "&version=" + version));
        String dir = base + "/" + URL.encode(iface) + "/providers";
        for (String child : client.getChildren().forPath(dir)) {
            URL provider = URL.valueOf(URL.decode(child));
            boolean enabled = provider.hasParameter("disabled")
                    ? !provider.getParameter("disabled", false)
                    : provider.getParameter("enabled", true);
            System.out.println("provider " + provider.getProtocol() + " " + provider.getHost() + " "
                    + provider.getPort() + " enabled=" + enabled + " match=" + UrlUtils.isMatch(consumer, provider));
        }
    }

    private static void curator(CuratorFramework client, String base, String name) throws Exception {
        try (ServiceDiscovery<ZookeeperInstance> discovery = ServiceDiscoveryBuilder.builder(ZookeeperInstance.class)
                .client(client)
                .basePath(base)
                .serializer(new JsonInstanceSerializer<>(ZookeeperInstance.class))
                .build()) {
            discovery.start();
            for (ServiceInstance<ZookeeperInstance> i : discovery.queryForInstances(name)) {
                String status = i.getPayload() == null ? null : i.getPayload().getMetadata().get("instance_status");
                System.out.println("instance " + i.getAddress() + " " + i.getPort() + " status=" + status
                        + " uri=" + i.buildUriSpec());
            }
        }
    }
}
