#!/bin/sh
# udhcpc event script: configure eth0 from the lease (busybox ships none).
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for ns in $dns; do echo "nameserver $ns" >> /etc/resolv.conf; done
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        ;;
    deconfig)
        ip addr flush dev "$interface"
        ;;
esac
exit 0
