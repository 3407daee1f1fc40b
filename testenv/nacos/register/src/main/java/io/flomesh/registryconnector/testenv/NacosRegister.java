package io.flomesh.registryconnector.testenv;

import com.alibaba.nacos.api.PropertyKeyConst;
import com.alibaba.nacos.api.naming.NamingFactory;
import com.alibaba.nacos.api.naming.NamingService;
import com.alibaba.nacos.api.naming.pojo.Instance;
import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

/**
 * Registers ephemeral instances through Nacos's own Java client (gRPC, port HTTP+1000), the
 * way an application registers itself, and stays connected until it is killed: its
 * instances live as long as its connection. Test data uses documentation addresses only;
 * Nacos never contacts an ephemeral instance.
 *
 * <pre>
 * usage: NacosRegister [--namespace ID] [--until-stdin-closes] HOST:HTTP_PORT INSTANCE...
 *   INSTANCE = GROUP|SERVICE|IP|PORT[|CLUSTER[|KEY=VALUE,KEY=VALUE...]]
 * </pre>
 *
 * ('|' separates the fields, so service names may hold ':' as Dubbo's do, and IPs may be
 * IPv6.) Prints one "registered GROUP@@SERVICE IP:PORT" line per instance, then "ready N"
 * once all N are registered. With --until-stdin-closes it also exits when its standard input
 * reaches end of file (its parent went away). Nacos 2.x keeps one instance per service and
 * connection: several instances of one service are registered with batchRegisterInstance.
 */
public class NacosRegister {
    public static void main(String[] args) throws Exception {
        String namespace = null;
        boolean untilStdinCloses = false;
        int i = 0;
        for (; i < args.length && args[i].startsWith("--"); i++) {
            switch (args[i]) {
                case "--namespace" -> namespace = args[++i];
                case "--until-stdin-closes" -> untilStdinCloses = true;
                default -> usage("unknown option " + args[i]);
            }
        }
        if (args.length - i < 2) {
            usage("an address and at least one instance are required");
        }
        String addr = args[i++];

        // (group, service) -> its instances, in command-line order.
        Map<List<String>, List<Instance>> services = new LinkedHashMap<>();
        int count = 0;
        for (; i < args.length; i++) {
            String[] f = args[i].split("\\|", -1);
            if (f.length < 4 || f.length > 6) {
                usage("not GROUP|SERVICE|IP|PORT[|CLUSTER[|KEY=VALUE,...]]: " + args[i]);
            }
            Instance instance = new Instance();
            instance.setIp(f[2]);
            instance.setPort(Integer.parseInt(f[3]));
            instance.setEphemeral(true);
            if (f.length > 4 && !f[4].isEmpty()) {
                instance.setClusterName(f[4]);
            }
            if (f.length > 5 && !f[5].isEmpty()) {
                for (String kv : f[5].split(",")) {
                    int eq = kv.indexOf('=');
                    if (eq <= 0) {
                        usage("metadata entry is not KEY=VALUE: " + kv);
                    }
                    instance.getMetadata().put(kv.substring(0, eq), kv.substring(eq + 1));
                }
            }
            services.computeIfAbsent(List.of(f[0], f[1]), k -> new ArrayList<>()).add(instance);
            count++;
        }

        Properties props = new Properties();
        props.setProperty(PropertyKeyConst.SERVER_ADDR, addr);
        if (namespace != null) {
            props.setProperty(PropertyKeyConst.NAMESPACE, namespace);
        }
        NamingService naming = NamingFactory.createNamingService(props);
        for (Map.Entry<List<String>, List<Instance>> e : services.entrySet()) {
            String group = e.getKey().get(0);
            String service = e.getKey().get(1);
            List<Instance> instances = e.getValue();
            if (instances.size() == 1) {
                naming.registerInstance(service, group, instances.get(0));
            } else {
                naming.batchRegisterInstance(service, group, instances);
            }
            for (Instance instance : instances) {
                System.out.println("registered " + group + "@@" + service + " " + instance.getIp() + ":"
                        + instance.getPort());
            }
        }
        System.out.println("ready " + count);
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

    private static void usage(String why) {
        System.err.println("NacosRegister: " + why);
        System.err.println("usage: NacosRegister [--namespace ID] [--until-stdin-closes] HOST:HTTP_PORT "
                + "GROUP|SERVICE|IP|PORT[|CLUSTER[|KEY=VALUE,...]]...");
        System.exit(2);
    }
}
