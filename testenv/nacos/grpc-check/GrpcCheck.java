import com.alibaba.nacos.api.PropertyKeyConst;
import com.alibaba.nacos.api.naming.NamingFactory;
import com.alibaba.nacos.api.naming.NamingService;
import com.alibaba.nacos.api.naming.listener.NamingEvent;
import com.alibaba.nacos.api.naming.pojo.Instance;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * Registers an ephemeral instance (192.0.2.20, a documentation address that nothing ever
 * contacts) through Nacos's Java client, which speaks gRPC, subscribes to its service and
 * waits for the server to push the instance, then its removal. Exits 0 on success.
 *
 * usage: java -cp 'lib/*' GrpcCheck.java 127.0.0.1:HTTP_PORT
 */
public class GrpcCheck {
    public static void main(String[] args) throws Exception {
        String service = "grpc-check-" + Long.toHexString(System.nanoTime());
        Properties props = new Properties();
        props.setProperty(PropertyKeyConst.SERVER_ADDR, args[0]);
        NamingService naming = NamingFactory.createNamingService(props);
        BlockingQueue<List<Instance>> pushes = new LinkedBlockingQueue<>();
        naming.subscribe(service, event -> pushes.add(((NamingEvent) event).getInstances()));

        Instance instance = new Instance();
        instance.setIp("192.0.2.20");
        instance.setPort(8080);
        instance.setEphemeral(true);
        instance.getMetadata().put("via", "grpc");
        naming.registerInstance(service, instance);
        List<Instance> seen = awaitPush(pushes, 1);
        System.out.println("registered over gRPC, pushed to the subscriber: " + seen.get(0).getIp() + ":"
                + seen.get(0).getPort() + " " + seen.get(0).getMetadata());
        System.out.println("server state: " + naming.getServerStatus());

        naming.deregisterInstance(service, instance);
        awaitPush(pushes, 0);
        System.out.println("deregistered over gRPC, subscriber told the service is empty: " + service);
        naming.shutDown();
        System.exit(0);
    }

    private static List<Instance> awaitPush(BlockingQueue<List<Instance>> pushes, int want) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
        while (System.nanoTime() < deadline) {
            List<Instance> got = pushes.poll(1, TimeUnit.SECONDS);
            if (got != null && got.size() == want) {
                return got;
            }
        }
        System.err.println("no push with " + want + " instance(s) within 30 s");
        System.exit(1);
        return null;
    }
}
