"""BPF_PROG_TEST_RUN of the pod-side programs (redtap_pod_req on a pod veth's
egress, redtap_pod_resp on its ingress): they do what redtap_req/redtap_resp
do, and also take a pod's own request to a server of the node's host stack
(an EP_HOST endpoint) the other way round: request on ingress, response on
egress. One behaviour per test."""
from pyloader.kernel import abi

from support import packets as P

UNSPEC = 0xFFFFFFFF
POD = ("198.18.0.20", 40000)        # the client pod
NODE_IP = "198.19.0.11"             # the node's own address
HOST_SERVER = (NODE_IP, 9100)       # a hostNetwork server


def to_host(h, c, path="/metrics"):
    assert h.pod_ingress(c.req(P.get(path))) == UNSPEC      # pod -> host: veth ingress
    assert h.pod_egress(c.resp(P.response(200))) == UNSPEC  # host -> pod: veth egress


def test_pod_request_to_a_host_server_is_recorded_on_the_pods_veth(h):
    h.reset(endpoints=[f"{NODE_IP}:9100"], host_addrs=[NODE_IP])
    to_host(h, P.Conn(client=POD, server=HOST_SERVER))
    (ev,) = h.events()
    assert ev["url"] == b"/metrics" and ev["status"] == 200
    assert ev["cport"] == 40000 and ev["sport"] == 9100
    assert ev["saddr"][-4:] == bytes([198, 19, 0, 11])
    s = h.stats()
    assert s["requests"] == s["responses"] == s["events"] == 1
    assert not set(s) & set(abi.LOSS_STATS)


def test_the_same_endpoint_not_flagged_host_is_not_taken_the_other_way(h):
    h.reset(endpoints=[f"{NODE_IP}:9100"], host_addrs=[])  # a pod's server, not the host's
    to_host(h, P.Conn(client=POD, server=HOST_SERVER))
    assert h.events() == [] and h.stats() == {}


def test_another_port_of_the_node_is_not_traced(h):
    h.reset(endpoints=[f"{NODE_IP}:9100"], host_addrs=[NODE_IP])
    to_host(h, P.Conn(client=POD, server=(NODE_IP, 9200)))
    assert h.events() == [] and h.stats() == {}


def test_host_programs_keep_the_plain_direction_rule(h):
    # on host interfaces (uplink, lo) a request to the host server comes in
    # through redtap_req; redtap_resp must not take it as a request
    h.reset(endpoints=[f"{NODE_IP}:9100"], host_addrs=[NODE_IP])
    c = P.Conn(client=POD, server=HOST_SERVER)
    h.resp(c.req(P.get("/metrics")))
    h.req(c.resp(P.response(200)))
    assert h.events() == [] and h.stats().get("requests", 0) == 0


def test_pod_server_traffic_is_unchanged_on_pod_programs(h):
    h.reset(endpoints=["198.18.0.10:80", f"{NODE_IP}:9100"], host_addrs=[NODE_IP])
    c = P.Conn()  # a client to the pod's server 198.18.0.10:80
    h.pod_egress(c.req(P.get("/pod")))
    h.pod_ingress(c.resp(P.response(201)))
    (ev,) = h.events()
    assert ev["url"] == b"/pod" and ev["status"] == 201


def test_pod_with_an_ip_only_endpoint_calling_the_host(h):
    # the client pod is itself traced by address alone (any port): its request
    # to the host server is still a request, not a response of its own
    h.reset(endpoints=[POD[0], f"{NODE_IP}:9100"], host_addrs=[NODE_IP])
    to_host(h, P.Conn(client=POD, server=HOST_SERVER))
    (ev,) = h.events()
    assert ev["sport"] == 9100 and ev["status"] == 200


def test_settings_count_the_host_endpoints(h):
    h.reset(endpoints=[f"{NODE_IP}:9100", f"{NODE_IP}:9101", "198.18.0.10:80"],
            host_addrs=[NODE_IP])
    raw = h.t.obj.map("settings").lookup((0).to_bytes(4, "little"))
    assert abi.Settings.from_buffer_copy(raw).host_endpoints == 2
    h.reset(endpoints=["198.18.0.10:80"])
    raw = h.t.obj.map("settings").lookup((0).to_bytes(4, "little"))
    assert abi.Settings.from_buffer_copy(raw).host_endpoints == 0


def test_ipv6_pod_to_host_server(h):
    node6 = "2001:db8::11"
    h.reset(endpoints=[f"[{node6}]:9100"], host_addrs=[node6])
    to_host(h, P.Conn(client=("2001:db8:1::20", 40000), server=(node6, 9100)))
    (ev,) = h.events()
    assert ev["status"] == 200 and ev["sport"] == 9100
