package org.springframework.cloud.zookeeper.discovery;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The fixture's stand-in for Spring Cloud Zookeeper's payload class of the same name, so
 * that a Curator service-discovery instance registered by ZookeeperRegister carries the
 * payload a Spring Cloud Zookeeper application writes: Curator's JSON serializer tags the
 * payload with its Java class name,
 * {@code "payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
 * "id":...,"name":...,"metadata":{...}}}. Only the three properties of that JSON shape;
 * Spring itself is not on the class path.
 */
public class ZookeeperInstance {
    private String id;
    private String name;
    private Map<String, String> metadata = new LinkedHashMap<>();

    /** For Jackson (Curator's JsonInstanceSerializer reads instances back too). */
    public ZookeeperInstance() {
    }

    public ZookeeperInstance(String id, String name, Map<String, String> metadata) {
        this.id = id;
        this.name = name;
        this.metadata = metadata;
    }

    public String getId() {
        return id;
    }

    public void setId(String id) {
        this.id = id;
    }

    public String getName() {
        return name;
    }

    public void setName(String name) {
        this.name = name;
    }

    public Map<String, String> getMetadata() {
        return metadata;
    }

    public void setMetadata(Map<String, String> metadata) {
        this.metadata = metadata;
    }
}
