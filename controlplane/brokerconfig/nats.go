package brokerconfig

import (
	"fmt"
	"strings"
)

// NATSNode is one server of a NATS cluster for hangar.
type NATSNode struct {
	Name       string // server_name, unique in the cluster
	Host       string // address the node listens on and the others reach it by
	ClientPort int    // NATS clients (the control plane)
	MQTTPort   int    // devices
	RoutePort  int    // the other nodes
	HTTPPort   int    // monitoring (/healthz); 0: none
	StoreDir   string // JetStream's files
}

// NATSCluster is what every node's configuration shares.
type NATSCluster struct {
	Nodes []NATSNode
	// User and Password are the control plane's account: it is exempt
	// from the auth callout and answers it for everyone else.
	User, Password string
	// CalloutIssuer is the public account key (A...) the callout's
	// answers are signed with.
	CalloutIssuer string
	// MaxFileStore bounds JetStream's disk use per node (default 16GB).
	MaxFileStore string
	// RoutePassword, when set, is what the nodes authenticate their
	// routes with: nothing else joins the cluster.
	RoutePassword string
}

// NATSConfig is the configuration of node i: JetStream, the MQTT
// listener with its streams replicated on three nodes (or all, when
// fewer), routes to every node, and device authentication delegated to
// hangar's auth callout.
func NATSConfig(c NATSCluster, i int) string {
	n := c.Nodes[i]
	var routes []string
	cred := ""
	if c.RoutePassword != "" {
		cred = "route:" + c.RoutePassword + "@"
	}
	for _, o := range c.Nodes {
		routes = append(routes, fmt.Sprintf("nats-route://%s%s:%d", cred, o.Host, o.RoutePort))
	}
	store := c.MaxFileStore
	if store == "" {
		store = "16GB"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# NATS node %s for hangar (hangar broker-config nats)\n", n.Name)
	fmt.Fprintf(&b, "server_name: %s\nlisten: %s:%d\n", n.Name, n.Host, n.ClientPort)
	if n.HTTPPort != 0 {
		fmt.Fprintf(&b, "http: %s:%d\n", n.Host, n.HTTPPort)
	}
	fmt.Fprintf(&b, "jetstream { store_dir: %q, max_mem_store: 256MB, max_file_store: %s }\n", n.StoreDir, store)
	routeAuth := ""
	if c.RoutePassword != "" {
		routeAuth = fmt.Sprintf(", authorization { user: route, password: %q }", c.RoutePassword)
	}
	fmt.Fprintf(&b, "cluster { name: hangar, listen: %s:%d%s, routes: [%s] }\n", n.Host, n.RoutePort, routeAuth, strings.Join(routes, ", "))
	// ack_wait: how long a command delivered to a device waits for its
	// PUBACK before NATS sends it again.
	fmt.Fprintf(&b, "mqtt { listen: %s:%d, stream_replicas: %d, ack_wait: \"30s\" }\n", n.Host, n.MQTTPort, min(3, len(c.Nodes)))
	fmt.Fprintf(&b, "authorization {\n  timeout: 5s\n  users: [ { user: %q, password: %q } ]\n", c.User, c.Password)
	fmt.Fprintf(&b, "  # every other CONNECT is decided by hangar (the control plane's replicas)\n")
	fmt.Fprintf(&b, "  auth_callout { issuer: %q, auth_users: [ %q ] }\n}\n", c.CalloutIssuer, c.User)
	return b.String()
}
