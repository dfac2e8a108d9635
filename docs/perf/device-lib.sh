# Sourced by the 2-CPU device run scripts (scripts/device-bundle copies it next to run.sh):
# puts the bundle's programs first on PATH, prepares nginx's and the harness's folders, picks
# two physical cores (CPU 0 as $a, and as $b the first CPU that is not its SMT sibling), sends
# everything to $OUT/all.log as well, and prints the machine.
D=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
chmod +x "$D"/bin/*
a=0
sib=$(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list 2>/dev/null || echo 0)
b=1
while [[ ",$sib," == *",$b,"* ]] || [[ "$sib" =~ ^0-([0-9]+)$ && $b -le ${BASH_REMATCH[1]} ]]; do b=$((b + 1)); done
exec > >(tee "$OUT/all.log") 2>&1
echo "cpu0 siblings: $sib; wrk on CPU $a, the proxy on CPU $b"
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L1i|L2|L3'
uname -r
