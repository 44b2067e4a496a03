package testbed_test

import (
	"context"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
)

const redisIP = "10.88.0.40"

var incrRE = regexp.MustCompile(`redis-incr acked=(\d+) last=(\d+) max_wait_ms=(\d+)`)

// redisCmd runs one Redis command from the client and returns the reply.
func redisCmd(t *testing.T, tb *testbed.Testbed, args ...string) string {
	t.Helper()
	return redisAt(t, tb, redisIP, args...)
}

// redisAt runs one command against the Redis at ip from the client and returns the reply.
func redisAt(t *testing.T, tb *testbed.Testbed, ip string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	cmd, err := tb.Command(ctx, testbed.ClientName, append([]string{tb.MemloadBin, "-redis-cmd", ip + ":6379"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("redis %v: %v: %s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// Redis persisting every write (appendfsync always) to a named volume, under a client
// that INCRs a key on one connection, moved a -> b: no acknowledged INCR is lost, the
// connection survives, and Redis restarted on b from its AOF has the same value.
func TestRedisAOFThroughAMove(t *testing.T) {
	tb := upAgents(t, "redis", testbed.Link{RateMbit: 100, Delay: 5 * time.Millisecond})
	mustMigrate(t, tb, "run", "--on", "a", "--name", "redis", "--ip", redisIP+"/16", "-v", "redisdata:/data", "--memory", "512m",
		testbed.ImageV1, "redis-server", "--appendonly", "yes", "--appendfsync", "always", "--dir", "/data", "--save", "",
		"--protected-mode", "no", "--bind", "0.0.0.0", "--port", "6379")
	if got := redisCmd(t, tb, "PING"); got != "PONG" {
		t.Fatalf("PING: %q", got)
	}
	wait := startClientFor(t, tb, 2*time.Minute, tb.MemloadBin, "-redis-incr", redisIP+":6379", "-key", "hits", "-for", "12s")
	// Once INCRs have been acknowledged for a while, move it.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if v, _ := strconv.Atoi(redisCmd(t, tb, "GET", "hits")); v > 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client's INCRs do not arrive")
		}
	}
	r := pushArgs(t, tb, "redis", "--to", "b")
	out, err := wait()
	m := incrRE.FindStringSubmatch(string(out))
	if err != nil || m == nil {
		t.Fatalf("the client failed through the move (its connection must survive): %v\n%s", err, out)
	}
	acked, _ := strconv.Atoi(m[2])
	t.Logf("client: %s acknowledged INCRs, last value %s, longest wait %s ms; push held traffic %s, volume passes %+v", m[1], m[2], m[3], r.Frozen, r.Volumes)
	if got := where(t, tb, "redis"); len(got) != 1 || got[0] != "b" {
		t.Fatalf("redis runs on %v", got)
	}
	value, err := strconv.Atoi(redisCmd(t, tb, "GET", "hits"))
	if err != nil || value < acked {
		t.Fatalf("after the move hits = %d (%v), the client had %d acknowledged", value, err, acked)
	}
	// The AOF on b's volume holds every acknowledged write: Redis restarted from it.
	hostRun(t, tb, "b", "podman", "restart", "-t", "5", "redis")
	var after int
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cmd, _ := tb.Command(ctx, testbed.ClientName, tb.MemloadBin, "-redis-cmd", redisIP+":6379", "GET", "hits")
		o, err := cmd.CombinedOutput()
		cancel()
		if err == nil {
			after, err = strconv.Atoi(strings.TrimSpace(string(o)))
			if err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Redis on b does not answer after its restart: %s", o)
		}
	}
	if after != value {
		t.Fatalf("Redis restarted on b from its AOF has hits = %d, before the restart %d", after, value)
	}
	mustMigrate(t, tb, "rm", "redis")
}

// nginx serving a 200 MB file from a named volume to a client that downloads it through
// a move: what arrived has the file's SHA-256.
func TestNginxDownloadThroughAMove(t *testing.T) {
	tb := upAgents(t, "nginx", testbed.Link{RateMbit: 1000, Delay: 2 * time.Millisecond})
	const ip = "10.88.0.41"
	conf := `user root; worker_processes 1; pid /tmp/nginx.pid; events {} ` +
		`http { access_log off; server { listen 80; root /data/www; } }`
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", ip+"/16", "-v", "www:/data", testbed.ImageV1, "sh", "-c",
		`mkdir -p /data/www && dd if=/dev/urandom of=/data/www/big bs=1M count=200 2>/dev/null && sha256sum /data/www/big > /data/sum && `+
			`echo '`+conf+`' > /tmp/nginx.conf && exec nginx -c /tmp/nginx.conf -g 'daemon off;'`)
	var want string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		out, _, code := migrate(t, tb, "exec", "web", "--", "cat", "/data/sum")
		if f := strings.Fields(out); code == 0 && len(f) == 2 {
			want = f[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the file to serve was not made")
		}
	}
	// 200 MB at 10 MB/s: the move lands in the middle of the download.
	wait := startClientFor(t, tb, 3*time.Minute, "sh", "-c", "curl -sS --fail --retry 0 --limit-rate 10M http://"+ip+"/big | sha256sum")
	waitWire(t, tb, testbed.ClientName, false, 20<<20, time.Minute) // 20 MB of 200 arrived
	r := pushArgs(t, tb, "web", "--to", "b")
	out, err := wait()
	if err != nil {
		t.Fatalf("download through the move: %v\n%s", err, out)
	}
	got := strings.Fields(string(out))
	if len(got) == 0 || got[0] != want {
		t.Fatalf("downloaded file's sha256 %q, the file's %s", out, want)
	}
	t.Logf("200 MB download intact through the move: held %s, volume passes %d+%d wire bytes", r.Frozen, r.Volumes[0].Wire, r.Volumes[1].Wire)
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "b" {
		t.Fatalf("web runs on %v", w)
	}
}

// PostgreSQL with its data directory on a named volume, pgbench -c 4 -T 60 running
// through a move: no failed transaction, no client lost its connection, and the TPC-B
// balances agree afterwards.
func TestPostgresPgbenchThroughAMove(t *testing.T) {
	tb := upAgents(t, "pg", testbed.Link{RateMbit: 100, Delay: 5 * time.Millisecond})
	const ip = "10.88.0.42"
	bin := "/usr/lib/postgresql/15/bin/"
	initdb := `[ -s /data/pg/PG_VERSION ] || { ` + bin + `initdb -D /data/pg -U postgres --auth=trust --locale=C -E UTF8 >/data/initdb.log 2>&1 && echo "host all all 0.0.0.0/0 trust" >> /data/pg/pg_hba.conf; }; ` +
		`exec ` + bin + `postgres -D /data/pg -c listen_addresses=* -c unix_socket_directories=/tmp -c shared_buffers=32MB`
	start := `chown postgres /data && exec su -s /bin/sh postgres -c '` + initdb + `'`
	// Without CAP_SYS_RESOURCE (this VM kind's bounding set lacks it) CRIU cannot dump a
	// process of another user: push's pre-flight must refuse one before anything freezes,
	// and the container runs on. PostgreSQL refuses to run as root, so here it runs as
	// root believing it is user postgres (testbed.AsUserLib), and the database's move is
	// proven all the same. With the capability it runs as postgres.
	if noSysResource() {
		mustMigrate(t, tb, "run", "--on", "a", "--name", "nonroot", "--ip", "10.88.0.43/16", testbed.ImageV1, "su", "-s", "/bin/sh", "postgres", "-c", "exec sleep 600")
		wantExit(t, tb, 1, []string{"process users", "CAP_SYS_RESOURCE"}, "push", "nonroot", "--to", "b")
		if w := where(t, tb, "nonroot"); len(w) != 1 || w[0] != "a" {
			t.Fatalf("after the refused push, nonroot runs on %v, want a", w)
		}
		mustMigrate(t, tb, "rm", "nonroot")
		t.Log("this host lacks CAP_SYS_RESOURCE: the move of a non-root process was refused at the pre-flight, as documented")
		start = `mkdir -p /data/pg && chown postgres /data/pg && chmod 700 /data/pg && export LD_PRELOAD=` + testbed.AsUserLib +
			` MIGRATE_TEST_AS_UID=999 && ` + initdb
	}
	mustMigrate(t, tb, "run", "--on", "a", "--name", "pg", "--ip", ip+"/16", "-v", "pgdata:/data", "--memory", "1g", testbed.ImagePG, "sh", "-c", start)
	client := func(limit time.Duration, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), limit)
		defer cancel()
		cmd, err := tb.Command(ctx, testbed.ClientName, args...)
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(300 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cmd, _ := tb.Command(ctx, testbed.ClientName, bin+"pg_isready", "-h", ip, "-U", "postgres")
		err := cmd.Run()
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			logs, _, _ := migrate(t, tb, "logs", "pg")
			t.Fatalf("PostgreSQL did not start: %s", logs)
		}
	}
	client(2*time.Minute, bin+"pgbench", "-h", ip, "-U", "postgres", "-i", "-s", "5", "-q", "postgres")
	const run = 60 * time.Second
	began := time.Now()
	wait := startClientFor(t, tb, 3*time.Minute, bin+"pgbench", "-h", ip, "-U", "postgres", "-c", "4", "-T", strconv.Itoa(int(run.Seconds())), "-P", "5", "postgres")
	// Transactions under way (100 KB of pgbench's traffic has reached the client), and
	// the move must end well before pgbench does: a move after its run proves nothing.
	waitWire(t, tb, testbed.ClientName, false, 100<<10, time.Minute)
	r := pushArgs(t, tb, "pg", "--to", "b")
	if !r.OK {
		t.Fatalf("push pg: %s", r.Error)
	}
	if ended := time.Since(began); ended > run-5*time.Second {
		t.Fatalf("the move ended %s after pgbench began, too close to the end of its %s run to prove anything", ended.Round(time.Second), run)
	}
	t.Logf("the move ended %s into pgbench's %s run (frozen %s)", time.Since(began).Round(time.Second), run, r.Frozen.Round(time.Millisecond))
	out, err := wait()
	if err != nil {
		t.Fatalf("pgbench through the move: %v\n%s", err, out)
	}
	report := string(out)
	t.Logf("pgbench:\n%s", report)
	t.Logf("push: held %s, volume passes %+v", r.Frozen, r.Volumes)
	if !strings.Contains(report, "number of failed transactions: 0 (") || strings.Contains(report, "aborted") {
		t.Fatalf("pgbench saw failures or lost a client (a reconnect):\n%s", report)
	}
	if w := where(t, tb, "pg"); len(w) != 1 || w[0] != "b" {
		t.Fatalf("pg runs on %v after the move, want b", w)
	}
	sums := strings.Fields(client(time.Minute, "psql", "-h", ip, "-U", "postgres", "-At", "-F", " ", "-c",
		"select (select count(*) from pgbench_accounts), (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers), "+
			"(select sum(bbalance) from pgbench_branches), (select coalesce(sum(delta),0) from pgbench_history), (select count(*) from pgbench_history)", "postgres"))
	if len(sums) != 6 || sums[0] != "500000" || sums[1] != sums[2] || sums[2] != sums[3] || sums[3] != sums[4] || sums[5] == "0" {
		t.Fatalf("after the move: accounts, balances (accounts, tellers, branches, history) and history rows %v: want 500000 accounts and four equal sums", sums)
	}
	t.Logf("afterwards on b: %s history rows, balances %s", sums[5], sums[1])
}

// noSysResource reports whether this machine lacks CAP_SYS_RESOURCE (the agents run with
// the same bounding set as the tests).
func noSysResource() bool {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapBnd:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && n&(1<<24) == 0
		}
	}
	return false
}
