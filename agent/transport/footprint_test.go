package transport_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/hangarfleet/hangar/agent/transport"
)

// TestMain doubles as a broker process for BenchmarkFootprint, so that the
// broker's memory is not counted with the clients'.
func TestMain(m *testing.M) {
	if os.Getenv("HANGAR_TEST_BROKER") == "1" {
		srv := mochi.New(&mochi.Options{Logger: slog.New(slog.DiscardHandler)})
		_ = srv.AddHook(new(authHook), nil)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		_ = srv.AddListener(listeners.NewNet("t", ln))
		go srv.Serve()
		fmt.Println(ln.Addr().String())
		// Until the benchmark closes our stdin.
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		return
	}
	os.Exit(m.Run())
}

func brokerProcess(b *testing.B) string {
	cmd := exec.Command(os.Args[0], "-test.run", "^$")
	cmd.Env = append(os.Environ(), "HANGAR_TEST_BROKER=1")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { in.Close(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		b.Fatal(err)
	}
	return "tcp://" + strings.TrimSpace(line)
}

func footprint() (goroutines int, stack, heap uint64) {
	for range 3 {
		runtime.GC()
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return runtime.NumGoroutine(), m.StackInuse, m.HeapAlloc
}

// BenchmarkFootprint: what one idle connection (subscribed, one publish
// acknowledged) costs the process holding it, per transport: goroutines,
// stack and live heap bytes. The broker runs in another process.
func BenchmarkFootprint(b *testing.B) {
	const conns = 500
	url := brokerProcess(b)
	for _, im := range impls {
		b.Run(im.name, func(b *testing.B) {
			tr := im.new()
			for b.Loop() {
				g0, s0, h0 := footprint()
				var cs []transport.Conn
				for i := range conns {
					p := params(url, fmt.Sprintf("fp-%s-%d", im.name, i))
					p.OnMessage = func(string, []byte) {}
					c, err := tr.Connect(context.Background(), p)
					if err != nil {
						b.Fatal(err)
					}
					if err := c.Subscribe(context.Background(), fmt.Sprintf("fp/%d/cmd", i)); err != nil {
						b.Fatal(err)
					}
					if err := c.Publish(fmt.Sprintf("fp/%d/state", i), []byte("hello")).Wait(context.Background()); err != nil {
						b.Fatal(err)
					}
					cs = append(cs, c)
				}
				time.Sleep(200 * time.Millisecond)
				g1, s1, h1 := footprint()
				b.ReportMetric(float64(g1-g0)/conns, "goroutines/conn")
				b.ReportMetric(float64(int64(s1)-int64(s0))/conns, "stack-B/conn")
				b.ReportMetric(float64(int64(h1)-int64(h0))/conns, "heap-B/conn")
				for _, c := range cs {
					c.Close()
				}
			}
		})
	}
}
