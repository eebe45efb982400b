"""pyhv's user-mode network (the VPNKit equivalent): guest Ethernet frames in, host sockets out.

Per-frame work is in `hvcore.net.packet` (parse), `netbuild`, `netreasm` and `netio`; this
package holds the flow logic and services, run on uvloop: `stack` (ARP/IPv4/ICMP dispatch),
`tcp` and `tcpnat` (flows, their host sockets in `hostsock`), `udp`, `dhcp`, `dns`, `forward`,
`control`, and the frame ports in `ports` / `tap` that the stack reads and writes without
knowing which.
"""
