"""pyhv's user-mode network (the VPNKit equivalent): guest Ethernet frames in, host sockets out.

Per-frame and per-segment work is in `hvcore.net` (`packet`: parse, `builder`: frames,
`reassembly`, `ports`: batched TAP I/O, `tcp`: the flows, `hostsock`: their host sockets);
this package holds the policy and services, run on uvloop: `stack` (ARP/IPv4/ICMP
dispatch), `tcpnat` (the flow table), `udp`, `dhcp`, `dns`, `forward`, `control`, and the
frame ports in `ports` / `tap` that the stack reads and writes without knowing which.
"""
