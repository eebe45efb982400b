#!/bin/busybox sh
# pyhv default guest init. The kernel command line carries what to do:
#   pyhv.cmd=BASE64   a shell-quoted command line (base64 so spaces, quotes and any bytes
#                     survive the kernel's parser); absent: an interactive shell
#   pyhv.share=TAG:/path   mount virtio-fs TAG at /path (repeatable)
#   pyhv.disk=DEV:/path    mount /dev/DEV at /path (repeatable)
#   pyhv.net=0        do not bring up eth0
#   pyhv.tty=0        no terminal on the host: the shell reads no input (as `docker run` without -i)
# The command's exit status is printed as one line, "PYHV-EXIT-STATUS: N", then the machine
# resets (reboot=k), which ends the VMM; the host turns the line into its own exit status.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /tmp /run /mnt
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

while read -r module; do
    insmod "/lib/modules/$module" 2>/dev/null
done < /etc/pyhv/modules

cmd_b64=""
net=1
tty=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyhv.cmd=*) cmd_b64="${arg#pyhv.cmd=}" ;;
        pyhv.net=0) net=0 ;;
        pyhv.tty=0) tty=0 ;;
        pyhv.share=*)
            spec="${arg#pyhv.share=}"
            mkdir -p "${spec#*:}" && mount -t virtiofs "${spec%%:*}" "${spec#*:}" ;;
        pyhv.disk=*)
            spec="${arg#pyhv.disk=}"
            mkdir -p "${spec#*:}" && mount "/dev/${spec%%:*}" "${spec#*:}" ;;
    esac
done

ip link set lo up
if [ "$net" = 1 ] && [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -s /etc/pyhv/udhcpc.sh -q -n -t 5 -T 1 >/dev/null 2>&1
fi

cd /root 2>/dev/null || cd /
if [ -n "$cmd_b64" ]; then
    cmd="$(echo "$cmd_b64" | base64 -d)"
    sh -c "eval \"\$1\"" pyhv "$cmd"
    status=$?
    echo "PYHV-EXIT-STATUS: $status"
elif [ "$tty" = 0 ]; then
    sh -l </dev/null
    echo "PYHV-EXIT-STATUS: $?"
else
    setsid cttyhack sh -l
    echo "PYHV-EXIT-STATUS: $?"
fi
sync
reboot -f
