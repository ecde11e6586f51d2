# Sourced by scripts/bench.sh and scripts/bench-delivery.sh: what both need
# before and while they run the worker end to end. Expects `bin` (the triagem
# binary), `model` and `say`; sets `out` (BENCH_OUT or a fresh directory) and
# `broker_bin`, and defines `topics`, `free_port`, `start_test_broker` and
# `wait_ready`.

out=${BENCH_OUT:-$(mktemp -d)}
mkdir -p "$out"

if [ ! -x "$bin" ] || [ ! -x "$(dirname "$bin")/triagem-test-broker" ]; then
  case "$bin" in
    target/release/triagem) say "building the release binaries"; cargo build --release --locked --bins >&2 ;;
    *) say "no $bin (or triagem-test-broker beside it)"; exit 2 ;;
  esac
fi
broker_bin="$(dirname "$bin")/triagem-test-broker"
[ -f "$model/config.json" ] || { say "no model in $model (scripts/demo.sh or triagem train makes models/triagem)"; exit 2; }

# The output topics of config/default.toml.
topics=(atendimento.venda atendimento.suporte atendimento.revisao atendimento.dlq)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_test_broker NAME [SERVE_ARGS...]: `triagem-test-broker serve` with the input topic (6 partitions) and
# the output topics (1 each), stdout and stderr in $out/NAME.out and .log; its pid joins `pids`, and `brokers`
# is its address.
start_test_broker() {
  local name=$1
  shift
  local specs=(--topic atendimento.mensagens:6)
  for t in "${topics[@]}"; do specs+=(--topic "$t:1"); done
  "$broker_bin" serve "$@" "${specs[@]}" >"$out/$name.out" 2>"$out/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^bootstrap.servers=' "$out/$name.out" 2>/dev/null && break; sleep 0.1; done
  brokers=$(sed -n 's/^bootstrap.servers=//p' "$out/$name.out" | head -1)
  [ -n "$brokers" ] || { say "the test broker did not start: $(cat "$out/$name.log")"; exit 1; }
}

# The worker's consumer session timeout in these runs: 6 s, as in the tests (librdkafka's default is 45 s).
# librdkafka's first join of a group sometimes rejoins at once (its leader sees the subscribed topic's
# metadata change between the JoinGroup and the assignment: "Metadata for subscribed topic(s) has changed"),
# and librdkafka's mock cluster (the test broker) then waits the session timeout less a second for other
# members before it answers — about one start in 25 on this machine, 44 s of a worker that routes nothing,
# longer than loadgen's 30 s wait. Kafka completes such a rejoin as soon as the known members are back.
export TRIAGEM__KAFKA__CONSUMER__SESSION__TIMEOUT__MS=${TRIAGEM__KAFKA__CONSUMER__SESSION__TIMEOUT__MS:-6000}

# wait_ready PORT: until the worker whose metrics listen on PORT answers /readyz (up to 60 s).
wait_ready() {
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
}
