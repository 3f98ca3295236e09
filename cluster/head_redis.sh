#!/usr/bin/env bash
# The replay Redis on a Ray cluster's head node (cluster/a100.yaml, cluster/gcp-a100.yaml start it
# from head_start_ray_commands). Generators on every node push trees into it; the controller (the
# job's driver, on the head) consumes them. One server per cluster; runs share it by key prefix.
#
#   head_redis.sh start             (re)start the server; run by `ray up` on every (re)start of Ray
#   head_redis.sh stop              SHUTDOWN (the AOF is fsynced first), then wait for the process
#   head_redis.sh status            PING, version, persistence and memory lines of INFO
#   head_redis.sh exec CMD [ARG...] run CMD with TREEPO_REDIS_PASSWORD and TREEPO_QUEUE_URL exported:
#                                   the `ray job submit` entrypoint wrapper (the job runs on the head)
#   head_redis.sh inspect [ARG...]  `treepo queue inspect` against this server
#
# Settings (environment variables):
#   TREEPO_REDIS_DIR           data directory: AOF, redis.conf, password, url (/mnt/treepo/redis)
#   TREEPO_REDIS_REQUIRE_FILE  refuse to start unless this file exists: the cluster YAML creates it
#                              on the persistent volume after mounting it, so the AOF never lands on
#                              a container's throw-away file system ('' = no check)
#   TREEPO_REDIS_PORT          6390. Never 6379: the Ray head's GCS listens there.
#   TREEPO_REDIS_BIND          address to listen on (default: this node's private IPv4 address),
#                              plus 127.0.0.1 for SSH tunnels (`ray attach -p 6390`); only private
#                              (RFC 1918) or loopback addresses are accepted
#   TREEPO_REDIS_MAXMEMORY     maxmemory (32gb); policy noeviction: eviction would drop streams
#   TREEPO_REDIS_APPENDFSYNC   everysec (loses <= ~1 s on a machine crash) | always
#   TREEPO_REDIS_PASSWORD      the job's password (ACL user treepo). Unset: the one kept in
#                              $TREEPO_REDIS_DIR/password (mode 0600; write your own there and restart
#                              to choose it), generated at the first start. Set at `start`: used and
#                              stored there, so `exec` hands the same one to the job.
#
# Two users. `treepo` (the job, through `exec`; its name is in TREEPO_QUEUE_URL) may run everything
# the queue needs and nothing in Redis's @dangerous category (CONFIG, DEBUG, FLUSHALL, FLUSHDB,
# SHUTDOWN, KEYS, ACL, MONITOR, REPLICAOF, ...) except INFO, nor SCRIPT FLUSH, SCRIPT DEBUG or FUNCTION
# (its Lua scripts run with EVALSHA and SCRIPT LOAD), on keys under treepo: only. `default`
# (the admin: this script's stop/status) has its own random password in $TREEPO_REDIS_DIR/admin_password
# (0600), which never leaves the head. No password appears on a command line (`ps` shows those):
# redis-server reads them from its 0600 config file (the job's as a SHA-256 hash), redis-cli from
# REDISCLI_AUTH. $TREEPO_REDIS_DIR is 0700 and redis-server starts with umask 077: the AOF (the
# queue's contents) is 0600.
set -euo pipefail

DIR=${TREEPO_REDIS_DIR:-/mnt/treepo/redis}
PORT=${TREEPO_REDIS_PORT:-6390}
MAXMEMORY=${TREEPO_REDIS_MAXMEMORY:-32gb}
APPENDFSYNC=${TREEPO_REDIS_APPENDFSYNC:-everysec}
REQUIRE_FILE=${TREEPO_REDIS_REQUIRE_FILE:-}
START_TIMEOUT_S=${TREEPO_REDIS_START_TIMEOUT_S:-600} # replaying a large AOF takes a while
STOP_TIMEOUT_S=${TREEPO_REDIS_STOP_TIMEOUT_S:-120}
RAY_GCS_PORT=6379
QUEUE_USER=treepo
QUEUE_ACL="resetchannels ~treepo:* -@all +@all -@dangerous +info -script|flush -script|debug -function" # as cluster/pipeline/redis_launcher.py

die() {
  echo "head_redis.sh: error: $*" >&2
  exit 1
}

is_private_ipv4() {
  local a b c d
  IFS=. read -r a b c d <<<"$1"
  for x in "$a" "$b" "$c" "$d"; do
    [[ "$x" =~ ^[0-9]{1,3}$ ]] && ((10#$x <= 255)) || return 1
  done
  a=$((10#$a)) b=$((10#$b))
  ((a == 10 || a == 127)) && return 0
  ((a == 172 && b >= 16 && b <= 31)) && return 0
  ((a == 192 && b == 168)) && return 0
  return 1
}

private_ip() {
  # The source address the kernel picks for a VPC-internal destination (a UDP connect sends nothing).
  python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("10.255.255.255", 1))
print(s.getsockname()[0])'
}

bind_address() {
  local ip=${TREEPO_REDIS_BIND:-}
  if [[ -z "$ip" ]]; then
    ip=$(private_ip) || die "cannot find this node's private address: set TREEPO_REDIS_BIND"
  fi
  is_private_ipv4 "$ip" ||
    die "refusing to listen on $ip: not a private (10/8, 172.16/12, 192.168/16) or loopback IPv4 address; set TREEPO_REDIS_BIND to the node's private address"
  echo "$ip"
}

check_settings() {
  [[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "TREEPO_REDIS_PORT=$PORT is not a TCP port"
  ((PORT != RAY_GCS_PORT)) || die "TREEPO_REDIS_PORT=$PORT is the Ray head's GCS port: use another (e.g. 6390)"
  [[ "$APPENDFSYNC" == everysec || "$APPENDFSYNC" == always ]] ||
    die "TREEPO_REDIS_APPENDFSYNC=$APPENDFSYNC is not everysec or always"
  [[ "$MAXMEMORY" =~ ^[0-9]+(b|kb|mb|gb)?$ ]] || die "TREEPO_REDIS_MAXMEMORY=$MAXMEMORY is not like 32gb"
}

check_version() {
  command -v redis-server >/dev/null ||
    die "redis-server not found: install Redis >= 7.0 (the cluster YAML's head_setup_commands do)"
  local v
  v=$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
  [[ -n "$v" ]] && ((v >= 7)) ||
    die "$(redis-server --version | head -n 1) is too old: the replay queue needs Redis >= 7.0 (XAUTOCLAIM, multi-part AOF)"
}

password() {
  # TREEPO_REDIS_PASSWORD if set (then stored), else the stored one, else a new random one (stored)
  local file="$DIR/password" pw
  umask 077
  if [[ -n "${TREEPO_REDIS_PASSWORD:-}" ]]; then
    printf '%s\n' "$TREEPO_REDIS_PASSWORD" >"$file.tmp" && mv -f "$file.tmp" "$file"
  elif [[ ! -s "$file" ]]; then
    # 32 random bytes as hex: od reads exactly 32 bytes, so no pipe is cut short under pipefail
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file.tmp" && echo >>"$file.tmp" && mv -f "$file.tmp" "$file"
  fi
  chmod 600 "$file"
  pw=$(head -n 1 "$file")
  [[ "$pw" =~ ^[A-Za-z0-9._~+/=@%:-]{16,512}$ ]] ||
    die "the Redis password (TREEPO_REDIS_PASSWORD or $file) must be 16-512 characters from A-Z a-z 0-9 . _ ~ + / = @ % : -"
  echo "$pw"
}

admin_password() {
  # the default (admin) user's password: generated once, never exported
  local file="$DIR/admin_password"
  umask 077
  if [[ ! -s "$file" ]]; then
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file.tmp" && echo >>"$file.tmp" && mv -f "$file.tmp" "$file"
  fi
  chmod 600 "$file"
  head -n 1 "$file"
}

cli() {
  # redis-cli as the admin against the running server; the password travels in the environment, not in argv
  local url
  url=$(cat "$DIR/url" 2>/dev/null) || die "no $DIR/url: the replay Redis was never started here (head_redis.sh start)"
  local hostport=${url#redis://}
  hostport=${hostport#*@}
  hostport=${hostport%/*}
  REDISCLI_AUTH=$(head -n 1 "$DIR/admin_password" 2>/dev/null) redis-cli --no-auth-warning \
    -h "${hostport%:*}" -p "${hostport##*:}" "$@"
}

alive() {
  # A zombie counts as gone: a daemon's parent is whatever reaps orphans, which in some containers is nobody.
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z ]]
}

server_pid() {
  # The pid in the pidfile, only if that process is still a redis-server (pids get reused).
  local pid
  pid=$(cat "$DIR/redis.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && grep -q redis-server "/proc/$pid/comm" 2>/dev/null && echo "$pid"
}

cmd_stop() {
  local pid
  pid=$(server_pid) || {
    echo "head_redis.sh: not running"
    return 0
  }
  # SHUTDOWN, or SIGTERM if that is refused (e.g. the stored password changed): both fsync the AOF
  cli shutdown >/dev/null 2>&1 || true
  local ticks=0 # of 0.2 s
  while alive "$pid"; do
    ((ticks == 25)) && kill -TERM "$pid" 2>/dev/null
    ((ticks++ < STOP_TIMEOUT_S * 5)) || die "redis-server (pid $pid) did not exit within ${STOP_TIMEOUT_S} s: see $DIR/redis.log"
    sleep 0.2
  done
  echo "head_redis.sh: stopped (pid $pid)"
}

cmd_start() {
  check_settings
  check_version
  if [[ -n "$REQUIRE_FILE" && ! -e "$REQUIRE_FILE" ]]; then
    die "$REQUIRE_FILE does not exist: the persistent data volume is not mounted (see the cluster YAML's initialization_commands)"
  fi
  local ip pw
  ip=$(bind_address)
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  if server_pid >/dev/null; then
    cmd_stop # settings (address, password, memory) may have changed; the data is in the AOF
  fi
  pw=$(password) # after the stop: SHUTDOWN authenticates with the stored (old) password
  local admin pw_hash
  admin=$(admin_password)
  [[ "$admin" != "$pw" ]] || die "$DIR/admin_password equals the job's password: delete $DIR/admin_password and start again"
  pw_hash=$(printf '%s' "$pw" | sha256sum | cut -c1-64)
  # also loopback: `ray attach -p 6390` tunnels to the head's 127.0.0.1 (not reachable from the network)
  local binds="$ip"
  [[ "$ip" == 127.* ]] || binds="$ip 127.0.0.1"
  umask 077
  cat >"$DIR/redis.conf.tmp" <<EOF
# written by cluster/head_redis.sh; holds the password: mode 0600
bind $binds
protected-mode yes
port $PORT
daemonize yes
dir "$DIR"
logfile "$DIR/redis.log"
pidfile "$DIR/redis.pid"
requirepass $admin
user $QUEUE_USER on #$pw_hash $QUEUE_ACL
appendonly yes
appenddirname "appendonlydir"
appendfsync $APPENDFSYNC
aof-use-rdb-preamble yes
save ""
maxmemory $MAXMEMORY
maxmemory-policy noeviction
tcp-keepalive 60
EOF
  mv -f "$DIR/redis.conf.tmp" "$DIR/redis.conf"
  printf 'redis://%s@%s:%s/0\n' "$QUEUE_USER" "$ip" "$PORT" >"$DIR/url"
  redis-server "$DIR/redis.conf" || die "redis-server failed to start; last lines of $DIR/redis.log:
$(tail -n 20 "$DIR/redis.log" 2>/dev/null)"
  local reply=""
  for _ in $(seq $((START_TIMEOUT_S * 5))); do
    reply=$(cli ping 2>&1 || true)
    [[ "$reply" == PONG ]] && {
      echo "head_redis.sh: replay Redis at $(cat "$DIR/url") (pid $(server_pid), AOF in $DIR/appendonlydir)"
      return 0
    }
    sleep 0.2
  done
  die "no PING answer within ${START_TIMEOUT_S} s (last reply: $reply); see $DIR/redis.log"
}

cmd_status() {
  local pid
  pid=$(server_pid) || die "not running (no live redis-server in $DIR/redis.pid)"
  echo "pid $pid, url $(cat "$DIR/url")"
  cli ping
  cli info server | grep -E '^redis_version'
  cli info persistence | grep -E '^(aof_enabled|aof_last_write_status|aof_last_bgrewrite_status|loading):'
  cli info memory | grep -E '^(used_memory_human|maxmemory_human|maxmemory_policy):'
}

cmd_exec() {
  (($# > 0)) || die "exec needs a command, e.g. head_redis.sh exec python -m cluster train --config ..."
  [[ -s "$DIR/password" && -s "$DIR/url" ]] ||
    die "no password/url in $DIR: start the replay Redis first (head_redis.sh start; \`ray up\` does)"
  [[ "$(cli ping 2>&1)" == PONG ]] ||
    die "the replay Redis at $(cat "$DIR/url") does not answer: check \`head_redis.sh status\` and $DIR/redis.log"
  TREEPO_REDIS_PASSWORD=$(head -n 1 "$DIR/password")
  TREEPO_QUEUE_URL=$(head -n 1 "$DIR/url")
  export TREEPO_REDIS_PASSWORD TREEPO_QUEUE_URL
  exec "$@"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
restart) cmd_stop && cmd_start ;;
status) cmd_status ;;
exec)
  shift
  cmd_exec "$@"
  ;;
inspect)
  shift
  cmd_exec sh -c 'exec python -m cluster queue inspect --url "$TREEPO_QUEUE_URL" "$@"' inspect "$@"
  ;;
*)
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
