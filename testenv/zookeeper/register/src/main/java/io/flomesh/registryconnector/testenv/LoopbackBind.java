package io.flomesh.registryconnector.testenv;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.apache.dubbo.common.URL;
import org.apache.dubbo.rpc.cluster.Configurator;
import org.apache.dubbo.rpc.cluster.ConfiguratorFactory;

/**
 * Keeps every Dubbo server of the fixture on 127.0.0.1 while the provider URL (what goes
 * into ZooKeeper) keeps the registered HOST:PORT of the test data.
 *
 * <p>Dubbo builds a provider URL from its protocol's host and port and carries the socket
 * address to listen on in its {@code bind.ip} / {@code bind.port} parameters, which
 * Dubbo's registry protocol removes before it registers the URL. Dubbo's own settings for
 * a separate bind address ({@code DUBBO_IP_TO_BIND}, {@code DUBBO_PORT_TO_BIND}) are one
 * value per protocol name for the whole JVM, and Dubbo never binds a 127.x address as
 * given (it takes 127.x and "localhost" for "no address" and listens on 0.0.0.0). So
 * this {@link ConfiguratorFactory}, registered under the protocol names {@code dubbo} and
 * {@code tri} (Dubbo's ServiceConfig applies the factory named after the URL's protocol
 * to each URL it exports, "to append extra parameters"), sets, per URL:
 *
 * <ul>
 *   <li>{@code bind.ip=::ffff:127.0.0.1}: 127.0.0.1 spelt as an IPv4-mapped IPv6 literal,
 *       which Dubbo does not take for "no address" and Java resolves to the IPv4 address
 *       127.0.0.1, so the server socket is bound to exactly 127.0.0.1:BIND_PORT;
 *   <li>{@code bind.port}: a free loopback port, one per registered protocol/host/port (two
 *       services of one provider share their server, as they do in a real application);
 *   <li>{@code anyhost=false} (never listen on the wildcard address).
 * </ul>
 *
 * Dubbo exports its MetadataService (application-level discovery) on the port of a server
 * it already has, read from that server's {@code bind.port}, and advertises that port in
 * the application's instance ({@code dubbo.metadata-service.url-params}); a URL whose
 * port is one of the loopback ports chosen here gets its registered port back, so the
 * MetadataService shares the provider's server and is advertised on PORT, as in an
 * application that listens where it registers.
 *
 * Nothing here contacts the registered address; Dubbo itself never connects to its own
 * provider address.
 */
public class LoopbackBind implements ConfiguratorFactory {
    static final String BIND_IP = "::ffff:127.0.0.1";

    /** protocol|host|registered port -> the loopback port bound for it. */
    private static final Map<String, Integer> PORTS = new ConcurrentHashMap<>();
    /** protocol|loopback port -> the registered port it stands for. */
    private static final Map<String, Integer> REGISTERED = new ConcurrentHashMap<>();

    /** The loopback port bound for a registered protocol/host/port (for the log line). */
    static Integer boundPort(String protocol, String host, int port) {
        return PORTS.get(key(protocol, host, port));
    }

    private static String key(String protocol, String host, int port) {
        String h = host.startsWith("[") ? host.substring(1, host.length() - 1) : host;
        return protocol + "|" + h + "|" + port;
    }

    private static int freeLoopbackPort() {
        try (ServerSocket s = new ServerSocket(0, 1, InetAddress.getByAddress(new byte[] {127, 0, 0, 1}))) {
            return s.getLocalPort();
        } catch (IOException e) {
            throw new UncheckedIOException("no free port on 127.0.0.1", e);
        }
    }

    @Override
    public Configurator getConfigurator(URL url) {
        return new Configurator() {
            @Override
            public URL getUrl() {
                return url;
            }

            @Override
            public URL configure(URL u) {
                Integer registered = REGISTERED.get(u.getProtocol() + "|" + u.getPort());
                if (registered != null) {
                    u = u.setPort(registered);
                }
                String protocol = u.getProtocol();
                String host = u.getHost();
                int port = PORTS.computeIfAbsent(key(protocol, host, u.getPort()), k -> {
                    int p = freeLoopbackPort();
                    REGISTERED.put(protocol + "|" + p, Integer.parseInt(k.substring(k.lastIndexOf('|') + 1)));
                    return p;
                });
                return u.addParameter("bind.ip", BIND_IP)
                        .addParameter("bind.port", port)
                        .addParameter("anyhost", false);
            }
        };
    }
}
