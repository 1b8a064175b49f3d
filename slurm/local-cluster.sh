#!/usr/bin/env bash
# A SLURM cluster of one or more nodes on this machine, for the tests and for trying `adm submit` /
# `adm pipeline` (and multi-node rendezvous with --nodes 2).
#
#   slurm/local-cluster.sh install            apt-get install slurm-wlm and munge (only what is missing)
#   slurm/local-cluster.sh start [--nodes N]  write slurm.conf, start munged, slurmctld, slurmd(s); wait for the nodes
#   slurm/local-cluster.sh stop               shut everything down and remove what 'start' made
#   slurm/local-cluster.sh status             print the daemons' state, the nodes, sinfo and squeue; exit 0 only when up
#
# Runs as root. No systemd, cgroups or accounting database are needed: processes are tracked with
# proctrack/linuxproc, tasks are not bound (task/none), and finished jobs stay visible to
# `scontrol show job` for a day (MinJobAge) and in a job-completion log (jobcomp/filetxt), which is how
# the tests see that a job completed.
#
# One node (the default): this host, under its own name, is the only node.
#
# N >= 2 nodes: every node is a slurmd in its own network and UTS namespace (host name adm-node1,
# adm-node2, ...) with its own address on a private bridge (admslurm0, $ADM_SLURM_SUBNET.0/24, the host
# is .1, node i is .(i+1)) joined by veth pairs; munged and slurmctld run on the host. Inside a node,
# /etc/hosts is a bind-mounted file that maps the node names to their bridge addresses, so a job there
# (which inherits the node's namespaces) sees its node's host name and address, and torch.distributed's
# rendezvous really crosses the namespaces. The namespaces have no default route: nothing they send can
# leave the bridge. 'start' refuses to run unless `ip route get` sends every node address through the
# bridge, and the network exists before slurmctld starts; 'stop' stops slurmctld before removing it.
# The nodes share this machine: each offers all its CPUs and memory.
#
# 'start' begins with an empty queue when no slurmctld runs (jobs of a cluster that died without 'stop'
# are forgotten); a running cluster keeps its jobs.
#
# Settings (environment):
#   ADM_SLURM_STATE   folder for state, logs and pid files   (default /var/lib/adm-local-slurm)
#   ADM_SLURM_CPUS    CPUs each node offers                  (default: nproc)
#   ADM_SLURM_SUBNET  first three octets of the nodes' /24   (default 10.149.14; must be unused here)
#   SLURM_CONF        the slurm.conf to write and use        (default /etc/slurm/slurm.conf)
set -euo pipefail

STATE=${ADM_SLURM_STATE:-/var/lib/adm-local-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# written by adm-guided slurm/local-cluster.sh"
HOST=$(hostname)
PARTITION=debug
START_TIMEOUT_S=${ADM_SLURM_START_TIMEOUT:-60}
MAX_NODES=8
# Multi-node mode: names of what it creates (nothing else on the machine is touched).
SUBNET=${ADM_SLURM_SUBNET:-10.149.14}
BRIDGE=admslurm0
VETH_PREFIX=admslurm-h      # host end of node i's veth pair: admslurm-h<i>; the node's end is its eth0
NODE_PREFIX=adm-node        # node i: network namespace, host name and SLURM node name adm-node<i>
MADE=$STATE/made            # what 'start' created outside the daemons' own files, for 'stop' to remove
RECORD=$STATE/cluster.env   # how many nodes the running cluster has
NODES=1

die() { echo "local-cluster: error: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root (daemons and $CONF need it), e.g. sudo $0 $1"
}

# ---------------------------------------------------------------------------------------------- install
cmd_install() {
  need_root install
  local missing=()
  command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
    && command -v sbatch >/dev/null 2>&1 || missing+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  if [ ${#missing[@]} -eq 0 ]; then
    say "slurm-wlm and munge already installed"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install ${missing[*]} with your package manager"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ------------------------------------------------------------------------------ what 'start' made
# $MADE has one line per thing to undo, in the order made: "file PATH", "dir PATH" (removed when
# empty), "tree PATH" (removed with its contents: a folder only our daemons write to), "netnsdir PATH"
# (ip's /run/netns mount), "hostsline LINE" (a line appended to /etc/hosts), "daemon munged".
made() {
  mkdir -p "$STATE"
  grep -qxF "$*" "$MADE" 2>/dev/null || echo "$*" >>"$MADE"
}

made_if_absent() {
  # Record PATH (of KIND) as made by us when it does not exist yet.
  local kind=$1 path=$2
  [ -e "$path" ] || made "$kind" "$path"
}

node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$SUBNET.$(($1 + 1))"; }
bridge_addr() { echo "$SUBNET.1"; }

recorded_nodes() {
  # Nodes of the cluster 'start' last set up (empty when none was).
  if [ -s "$RECORD" ]; then
    sed -n 's/^NODES=//p' "$RECORD"
  elif [ -e "$CONF" ] && grep -qF "$MARKER" "$CONF" 2>/dev/null; then
    echo 1
  fi
}

recorded_subnet() {
  { [ -s "$RECORD" ] && sed -n 's/^SUBNET=//p' "$RECORD"; } || true
}

node_names() {
  local i
  for i in $(seq "$NODES"); do node_name "$i"; done
}

# ------------------------------------------------------------------------------------------------ start
node_cpus() {
  # nproc honours OMP_NUM_THREADS: a caller that set it (a test, a job) must not get a different slurm.conf.
  echo "${ADM_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
}

node_memory_mb() {
  # Offer 90% of RAM so a job asking for "most of the node" still fits next to the daemons.
  awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.9 }' /proc/meminfo
}

write_conf() {
  local cpus mem
  cpus=$(node_cpus)
  mem=$(node_memory_mb)
  local ctld=$HOST spool=$STATE/slurmd pidf=$STATE/slurmd.pid logf=$STATE/slurmd.log
  if [ "$NODES" -gt 1 ]; then
    # The nodes reach the controller at the host's bridge address; %n is the node's name.
    ctld="$HOST($(bridge_addr))"
    spool=$STATE/slurmd-%n pidf=$STATE/slurmd-%n.pid logf=$STATE/slurmd-%n.log
  fi
  cat <<EOF
$MARKER
# Regenerated by 'start'; edit the script, not this file.
ClusterName=adm-local
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): keep tests quick.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$pidf
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$logf
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups in containers: track processes by parent pid, do not bind tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Tasks find each other through torch.distributed, not MPI; nobody reads mail here.
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# React to submissions and finished dependencies within a second or two, not a minute.
SchedulerParameters=sched_interval=2,bf_interval=2
# Keep finished jobs visible to 'scontrol show job' for a day: there is no accounting database.
MinJobAge=86400
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
JobRequeue=1
KillWait=10
# A node whose slurmd stops answering is DOWN after 30 s (default 300): its jobs end NODE_FAIL and are
# requeued (they are submitted with --requeue) instead of holding the other node for five minutes.
SlurmdTimeout=30
ReturnToService=2
SlurmdParameters=config_overrides
EOF
  if [ "$NODES" -eq 1 ]; then
    cat <<EOF
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  else
    local i
    echo "# $NODES nodes, each a slurmd in its own network namespace on bridge $BRIDGE (they share this machine)."
    for i in $(seq "$NODES"); do
      echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") NodeHostname=$(node_name "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=$NODE_PREFIX[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  fi
}

pid_alive() {
  # True when the pid file exists and names a live process.
  local file=$1 pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # A killed daemon stays a zombie where nothing reaps orphans (a container whose init does not): dead all the same.
  [ "$(sed 's/.*) \(.\).*/\1/' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

munge_ok() {
  command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
  if munge_ok; then
    return 0
  fi
  id munge >/dev/null 2>&1 || die "user 'munge' missing: run '$0 install' first"
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    made_if_absent dir /etc/munge
    mkdir -p /etc/munge
    made_if_absent file /etc/munge/munge.key
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  made_if_absent tree /run/munge
  made_if_absent file /var/lib/munge/munged.seed
  made_if_absent file /var/log/munge/munged.log
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  say "starting munged"
  made daemon munged
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  die "munged did not start; see /var/log/munge/munged.log"
}

node_state() {
  sinfo -h -n "$1" -o %T 2>/dev/null | head -n1 | tr -d '*~#' || true
}

ensure_host_resolves() {
  # The daemons, srun and torch.distributed's rendezvous all look this host's name up.
  if ! getent hosts "$HOST" >/dev/null 2>&1; then
    say "adding '127.0.0.1 $HOST' to /etc/hosts (the host name did not resolve; 'stop' removes it)"
    made hostsline "127.0.0.1 $HOST $MARKER"
    echo "127.0.0.1 $HOST $MARKER" >>/etc/hosts
  fi
}

controller_up() {
  scontrol ping 2>/dev/null | grep -q "is UP"
}

# ---------------------------------------------------------------------- the nodes' network (N >= 2)
route_dev() {
  # The interface `ip route get ADDR` sends ADDR through (empty when unroutable).
  ip route get "$1" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1
}

check_subnet_free() {
  # Refuse a range this machine already uses: an address on another interface, or a route (other than the
  # default route and our bridge's) that covers a node address.
  local o='(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])'
  [[ "$SUBNET" =~ ^(10\.$o\.$o|172\.(1[6-9]|2[0-9]|3[01])\.$o|192\.168\.$o)$ ]] \
    || die "ADM_SLURM_SUBNET='$SUBNET' is not the first three octets of a private /24 (10.x.y, 172.16-31.y, 192.168.y; e.g. 10.149.14)"
  local used i addr routes
  used=$(ip -o -4 addr show | awk -v b="$BRIDGE" '$2 != b { print $2, $4 }' | grep -F " $SUBNET." || true)
  [ -z "$used" ] || die "$SUBNET.0/24 is already in use here ($used); choose another with ADM_SLURM_SUBNET"
  # A gateway or name server in the range would be cut off by the bridge while the cluster runs.
  used=$( { ip -4 route show | sed -n 's/.* via \([0-9.]*\).*/\1/p'
            awk '$1 == "nameserver" { print $2 }' /etc/resolv.conf 2>/dev/null; } | grep -F "$SUBNET." \
          | grep -E "^${SUBNET//./\\.}\.[0-9]+$" || true)
  [ -z "$used" ] || die "$SUBNET.0/24 holds a gateway or name server of this machine ($(echo $used)); choose another with ADM_SLURM_SUBNET"
  for i in $(seq 0 "$NODES"); do
    addr=$SUBNET.$((i + 1))
    routes=$(ip -4 route show match "$addr" | grep -v '^default ' | grep -v " dev $BRIDGE " || true)
    [ -z "$routes" ] || die "$addr is already routed here ($routes); choose another range with ADM_SLURM_SUBNET"
  done
}

check_routes_use_bridge() {
  # Mandatory: slurmctld connects to every NodeAddr; one routed elsewhere would send our traffic off this machine.
  local i addr dev
  for i in $(seq "$NODES"); do
    addr=$(node_addr "$i")
    dev=$(route_dev "$addr")
    [ "$dev" = "$BRIDGE" ] || { echo "ip route get $addr: $(ip route get "$addr" 2>&1 | head -n1)" >&2; return 1; }
  done
}

network_complete() {
  local i
  ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
  for i in $(seq "$NODES"); do
    [ -e "/run/netns/$(node_name "$i")" ] || return 1
    ip link show "$VETH_PREFIX$i" >/dev/null 2>&1 || return 1
  done
}

no_ipv6() {
  # Keep a new, still-down interface quiet on IPv6 (no router solicitations, no DAD): $1 = interface,
  # $2 = namespace or empty for the host.
  local path=/proc/sys/net/ipv6/conf/$1/disable_ipv6
  if [ -z "${2:-}" ]; then
    [ -w "$path" ] && echo 1 >"$path" || true
  else
    nsenter --net="/run/netns/$2" sh -c "[ -w $path ] && echo 1 > $path" || true
  fi
}

write_node_hosts() {
  # /etc/hosts inside every node: node names -> bridge addresses (gloo picks its interface from the host name).
  local i
  {
    echo "$MARKER: /etc/hosts inside the nodes (bind-mounted there; the host's /etc/hosts is untouched)"
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    echo "$(bridge_addr) $HOST"
    for i in $(seq "$NODES"); do echo "$(node_addr "$i") $(node_name "$i")"; done
  } >"$STATE/hosts.tmp"
  mv "$STATE/hosts.tmp" "$STATE/hosts"
}

network_up() {
  # The bridge, and per node a namespace and a veth pair with the node's address. Idempotent.
  local i ns veth
  # util-linux's mount/umount (the nodes' hosts file, ip's /run/netns at stop) create /run/mount if missing.
  made_if_absent tree /run/mount
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "creating bridge $BRIDGE ($(bridge_addr)/24)"
    made_if_absent netnsdir /run/netns
    ip link add "$BRIDGE" type bridge
    no_ipv6 "$BRIDGE"
  fi
  ip addr replace "$(bridge_addr)/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$NODES"); do
    ns=$(node_name "$i")
    veth=$VETH_PREFIX$i
    if [ ! -e "/run/netns/$ns" ]; then
      made_if_absent netnsdir /run/netns
      ip netns add "$ns"
    fi
    if ! ip link show "$veth" >/dev/null 2>&1; then
      say "creating node $ns: namespace $ns, $veth <-> eth0 $(node_addr "$i")/24"
      ip -n "$ns" link del eth0 2>/dev/null || true
      ip link add "$veth" type veth peer name eth0 netns "$ns"
      no_ipv6 "$veth"
      no_ipv6 eth0 "$ns"
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip -n "$ns" addr replace "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
  write_node_hosts
}

network_down() {
  # Everything with our names: namespaces adm-node*, links admslurm*, and ip's /run/netns mount if we made it.
  local ns link
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NODE_PREFIX[0-9]+$" || true); do
    say "removing namespace $ns"
    ip netns del "$ns" || true
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
                | grep -E "^($VETH_PREFIX[0-9]+|$BRIDGE)$" || true); do
    say "removing link $link"
    ip link del "$link" 2>/dev/null || true
  done
}

start_node_slurmd() {
  # slurmd in the node's network namespace (made by `ip netns add`) and its own UTS and mount namespaces:
  # `ip netns exec` would remount /sys and lose the cgroup mounts, so enter with nsenter + unshare. The
  # bind mount of the hosts file is private to the node's mount namespace and goes when its last process does.
  local i=$1 ns
  ns=$(node_name "$i")
  mkdir -p "$STATE/slurmd-$ns"
  say "starting slurmd on $ns ($(node_addr "$i"))"
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1"' sh "$ns" "$STATE/hosts"
}

kill_node_processes() {
  # Whatever still runs inside our namespaces (job steps of a killed slurmd): TERM, then KILL.
  local ns pids=""
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NODE_PREFIX[0-9]+$" || true); do
    pids="$pids $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
  done
  pids=$(echo $pids)
  [ -n "$pids" ] || return 0
  say "stopping the processes left in the nodes: $pids"
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && return 0
    sleep 0.1
  done
  kill -9 $pids 2>/dev/null || true
  sleep 0.2
}

# ------------------------------------------------------------------------------------------------ start
parse_nodes() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; NODES=$2; shift 2 ;;
      --nodes=*) NODES=${1#--nodes=}; shift ;;
      *) die "unknown option '$1' (usage: $0 start [--nodes N])" ;;
    esac
  done
  [[ "$NODES" =~ ^[0-9]+$ ]] && [ "$NODES" -ge 1 ] && [ "$NODES" -le $MAX_NODES ] \
    || die "--nodes must be 1..$MAX_NODES, not '$NODES'"
}

anything_running() {
  local f
  for f in "$STATE"/slurmctld.pid "$STATE"/slurmd.pid "$STATE"/slurmd-*.pid; do
    pid_alive "$f" && return 0
  done
  ip link show "$BRIDGE" >/dev/null 2>&1
}

wait_for_node() {
  local node=$1 state="" deadline=$((SECONDS + START_TIMEOUT_S)) resumed=0
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state "$node")
    case "$state" in
      idle|mixed|allocated|completing) echo "$state"; return 0 ;;
      down|drained|draining|fail*)
        # A node left down by an earlier unclean stop: put it back in service once.
        if [ $resumed -eq 0 ]; then
          scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    sleep 0.2
  done
  echo "${state:-unknown}"
  return 1
}

cmd_start() {
  need_root start
  parse_nodes "$@"
  command -v slurmctld >/dev/null 2>&1 || die "slurmctld not found: run '$0 install' first"
  if [ "$NODES" -gt 1 ]; then
    local tool
    for tool in ip nsenter unshare; do
      command -v $tool >/dev/null 2>&1 || die "$tool not found: --nodes $NODES needs iproute2 and util-linux"
    done
    # Before anything is written: the nodes' range must be unused here (our own bridge aside).
    check_subnet_free
  fi
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's configuration (set SLURM_CONF to use another path)"
  fi
  local before before_subnet
  before=$(recorded_nodes)
  before_subnet=$(recorded_subnet)
  if [ -n "$before" ] && { [ "$before" != "$NODES" ] || { [ -n "$before_subnet" ] && [ "$before_subnet" != "$SUBNET" ]; }; } \
     && anything_running; then
    say "the running cluster has $before node(s)${before_subnet:+ on $before_subnet.0/24}: stopping it first"
    cmd_stop
  fi
  made_if_absent tree "$STATE"
  mkdir -p "$STATE/slurmctld"
  [ "$NODES" -eq 1 ] && mkdir -p "$STATE/slurmd"
  made_if_absent dir "$(dirname "$CONF")"
  mkdir -p "$(dirname "$CONF")"
  printf 'NODES=%s\nSUBNET=%s\n' "$NODES" "$([ "$NODES" -gt 1 ] && echo "$SUBNET")" >"$RECORD"
  local new restart=0
  new=$(write_conf)
  if [ ! -e "$CONF" ] || [ "$new" != "$(cat "$CONF")" ]; then
    printf '%s\n' "$new" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    restart=1
  fi
  if [ "$NODES" -gt 1 ]; then
    # The network must exist, and be ours, before slurmctld tries to reach a node address.
    if pid_alive "$STATE/slurmctld.pid" && ! network_complete; then
      say "the nodes' network is incomplete while slurmctld runs: stopping the daemons first"
      stop_slurm
    fi
    network_up
    if ! check_routes_use_bridge; then
      cmd_stop
      die "a node address is not routed through $BRIDGE (see above); refused to start and removed what was made. Choose another range with ADM_SLURM_SUBNET"
    fi
  else
    ensure_host_resolves
  fi
  start_munge
  if [ $restart -eq 1 ] && anything_running_daemon; then
    say "configuration changed: restarting the daemons"
    stop_slurm
  fi
  if ! pid_alive "$STATE/slurmctld.pid"; then
    # -c: a fresh controller forgets the jobs and node states of one that died without 'stop' (a crash, a
    # machine that went away): recovered, they would hold the nodes and queue every new job behind them.
    say "starting slurmctld"
    slurmctld -c
  fi
  for _ in $(seq $((START_TIMEOUT_S * 5))); do controller_up && break; sleep 0.2; done
  controller_up || die "slurmctld did not answer; see $STATE/slurmctld.log"
  local i node state
  if [ "$NODES" -eq 1 ]; then
    if ! pid_alive "$STATE/slurmd.pid"; then
      say "starting slurmd"
      slurmd
    fi
  else
    for i in $(seq "$NODES"); do
      pid_alive "$STATE/slurmd-$(node_name "$i").pid" || start_node_slurmd "$i"
    done
  fi
  if [ "$NODES" -eq 1 ]; then
    state=$(wait_for_node "$HOST") \
      || die "node $HOST is '$state' after ${START_TIMEOUT_S}s; see $STATE/slurmd.log and $STATE/slurmctld.log"
    say "up: node $HOST ($(node_cpus) CPUs) is $state in partition $PARTITION"
    return 0
  fi
  for i in $(seq "$NODES"); do
    node=$(node_name "$i")
    state=$(wait_for_node "$node") \
      || die "node $node is '$state' after ${START_TIMEOUT_S}s; see $STATE/slurmd-$node.log and $STATE/slurmctld.log"
    say "up: node $node ($(node_addr "$i"), $(node_cpus) CPUs) is $state in partition $PARTITION"
  done
}

anything_running_daemon() {
  local f
  for f in "$STATE"/slurmctld.pid "$STATE"/slurmd.pid "$STATE"/slurmd-*.pid; do
    pid_alive "$f" && return 0
  done
  return 1
}

# ------------------------------------------------------------------------------------------------- stop
wait_gone() {
  local file=$1
  for _ in $(seq 100); do pid_alive "$file" || return 0; sleep 0.1; done
  return 1
}

stop_one() {
  local file=$1 name=$2
  if pid_alive "$file"; then
    say "stopping $name"
    kill "$(cat "$file")" 2>/dev/null || true
    wait_gone "$file" || { kill -9 "$(cat "$file")" 2>/dev/null || true; }
  fi
  rm -f "$file"
}

stop_slurm() {
  # slurmd(s) first, then whatever they left in the nodes, then slurmctld: the network may go only after it.
  local f name
  for f in "$STATE"/slurmd.pid "$STATE"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    stop_one "$f" "${name/-/ on }"
  done
  kill_node_processes
  stop_one "$STATE/slurmctld.pid" slurmctld
}

remove_hosts_line() {
  # Without renaming /etc/hosts (it may be a bind mount).
  local line=$1 kept
  grep -qxF "$line" /etc/hosts 2>/dev/null || return 0
  kept=$(grep -vxF "$line" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

undo_made() {
  # What start made, newest first.
  [ -s "$MADE" ] || return 0
  local entries kind path
  entries=$(tac "$MADE")
  while IFS= read -r entry; do
    kind=${entry%% *}
    path=${entry#* }
    case "$kind" in
      file) rm -f "$path" ;;
      dir) rmdir "$path" 2>/dev/null || say "left $path (not empty)" ;;
      tree) rm -rf "$path" ;;
      netnsdir)
        if [ -d "$path" ] && [ -z "$(ls -A "$path")" ]; then
          while mountpoint -q "$path"; do umount "$path" || break; done
          rmdir "$path" 2>/dev/null || true
        fi ;;
      hostsline) remove_hosts_line "$path" ;;
      daemon) ;;
    esac
  done <<<"$entries"
}

cmd_stop() {
  need_root stop
  stop_slurm
  network_down
  # munged: only when 'start' started it (a cluster started by an older version of this script did not record it).
  if pid_alive /run/munge/munged.pid \
     && { grep -qxF "daemon munged" "$MADE" 2>/dev/null || [ ! -e "$MADE" ]; }; then
    stop_one /run/munge/munged.pid munged
  elif grep -qxF "daemon munged" "$MADE" 2>/dev/null; then
    # Our munged was killed (no clean exit): remove what it removes itself when it stops.
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  if [ -e "$CONF" ] && grep -qF "$MARKER" "$CONF"; then
    rm -f "$CONF" "$CONF.tmp"
  fi
  undo_made
  # The daemons' state and logs (when $STATE was not ours to remove as a whole, only what we put there).
  if [ -d "$STATE" ]; then
    rm -rf "$STATE"/slurmctld "$STATE"/slurmd "$STATE"/slurmd-* "$STATE"/*.log "$STATE"/*.pid \
           "$STATE"/hosts "$STATE"/hosts.tmp "$RECORD" "$MADE"
    rmdir "$STATE" 2>/dev/null || true
  fi
  say "stopped"
}

# ----------------------------------------------------------------------------------------------- status
cmd_status() {
  local up=0 i node f
  NODES=$(recorded_nodes)
  NODES=${NODES:-1}
  [ "$NODES" -gt 1 ] && SUBNET=$(recorded_subnet)
  if munge_ok; then echo "munged:    running"; else echo "munged:    not running"; up=1; fi
  if pid_alive "$STATE/slurmctld.pid"; then echo "slurmctld: running (pid $(cat "$STATE/slurmctld.pid"))"; else echo "slurmctld: not running"; up=1; fi
  if [ "$NODES" -eq 1 ]; then
    if pid_alive "$STATE/slurmd.pid"; then echo "slurmd:    running (pid $(cat "$STATE/slurmd.pid"))"; else echo "slurmd:    not running"; up=1; fi
    echo "config:    $CONF"
    echo "logs:      $STATE/slurmctld.log $STATE/slurmd.log  (finished jobs: $STATE/jobcomp.log)"
  else
    if ip link show "$BRIDGE" >/dev/null 2>&1; then echo "bridge:    $BRIDGE $(bridge_addr)/24"; else echo "bridge:    $BRIDGE missing"; up=1; fi
    echo "nodes:     $NODES"
    for i in $(seq "$NODES"); do
      node=$(node_name "$i")
      f=$STATE/slurmd-$node.pid
      printf '  %-10s %-15s namespace %s, ' "$node" "$(node_addr "$i")" \
        "$([ -e "/run/netns/$node" ] && echo present || echo missing)"
      if pid_alive "$f"; then echo "slurmd running (pid $(cat "$f"))"; else echo "slurmd not running"; up=1; fi
    done
    echo "config:    $CONF"
    echo "logs:      $STATE/slurmctld.log $STATE/slurmd-$NODE_PREFIX*.log  (finished jobs: $STATE/jobcomp.log)"
  fi
  if [ $up -eq 0 ] && controller_up; then
    if [ "$NODES" -gt 1 ]; then
      echo
      sinfo -N -o "%N %.10T %.5c %o"
    fi
    echo
    sinfo
    echo
    squeue
    return 0
  fi
  echo "cluster is down: start it with '$0 start'"
  return 3
}

case "${1:-}" in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install | start [--nodes N] | stop | status" >&2; exit 2 ;;
esac
