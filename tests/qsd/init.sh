#!/bin/sh
# /init of the qcowpy test guest. Kernel parameter qcowpy.mode= picks the scenario:
#   write   check the pattern qcowpy wrote, mkfs.ext4, write files, sync, fstrim, unmount
#   verify  mount and print the files' checksums
#   crash   mkfs.ext4 and write forever (the host kills QEMU)
# Every result is a "QCOWPY ..." line on the serial console; the host test parses them.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m 2>/dev/null; done
mode=$(sed -n 's/.*qcowpy.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "QCOWPY dev $(cat /sys/block/vda/size 2>/dev/null) sectors"
run() { "$@" || echo "QCOWPY FAIL $*"; }
case "$mode" in
write)
    echo "QCOWPY pattern $(dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
    run mkfs.ext4 -q -F -b 4096 /dev/vda
    run mount -t ext4 /dev/vda /mnt
    run dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null
    for n in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/small$n bs=4k count=$n 2>/dev/null; done
    run dd if=/dev/urandom of=/mnt/gone bs=1M count=4 2>/dev/null
    run sync
    run rm /mnt/gone
    for f in big small1 small2 small3 small4 small5 small6 small7 small8; do
        echo "QCOWPY file $f $(md5sum /mnt/$f | cut -d' ' -f1)"
    done
    echo "QCOWPY fstrim $(fstrim -v /mnt 2>&1)"
    run umount /mnt
    run sync
    echo "QCOWPY done"
    ;;
verify)
    run mount -t ext4 /dev/vda /mnt  # read-write: a journal left by a crash is replayed
    for f in $(ls /mnt); do [ -f /mnt/$f ] && echo "QCOWPY file $f $(md5sum /mnt/$f | cut -d' ' -f1)"; done
    run umount /mnt
    echo "QCOWPY done"
    ;;
crash)
    run mount -t ext4 /dev/vda /mnt
    echo "QCOWPY writing"
    n=0
    while true; do
        n=$((n+1))
        dd if=/dev/urandom of=/mnt/crash$n bs=64k count=16 conv=fsync 2>/dev/null
        echo "QCOWPY synced crash$n $(md5sum /mnt/crash$n | cut -d' ' -f1)"
    done
    ;;
bench)
    # times from /proc/uptime (10 ms); the page cache is dropped before every read
    t() { cut -d' ' -f1 /proc/uptime; }
    mib=$(sed -n 's/.*qcowpy.mib=\([0-9]*\).*/\1/p' /proc/cmdline)
    a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count=$mib conv=fsync 2>/dev/null; b=$(t)
    echo "QCOWPY bench seqwrite $mib $a $b"
    echo 3 > /proc/sys/vm/drop_caches
    a=$(t); dd if=/dev/vda of=/dev/null bs=1M count=$mib 2>/dev/null; b=$(t)
    echo "QCOWPY bench seqread $mib $a $b"
    echo 3 > /proc/sys/vm/drop_caches
    blocks=$((mib * 256)); n=0; seed=12345
    a=$(t)
    while [ $n -lt 400 ]; do
        seed=$(( (seed * 1103515245 + 12345) % 2147483648 ))
        dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$((seed % blocks)) 2>/dev/null
        n=$((n+1))
    done
    b=$(t)
    echo "QCOWPY bench randread4k 400 $a $b"
    echo "QCOWPY done"
    ;;
*)
    echo "QCOWPY unknown mode '$mode'"
    ;;
esac
poweroff -f
