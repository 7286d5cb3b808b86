package server_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

func get(b *testing.B, s interface{ URL() string }, token, path string) {
	req, _ := http.NewRequest(http.MethodGet, s.URL()+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Fatalf("GET %s: %d", path, resp.StatusCode)
	}
}

func reportQuantiles(b *testing.B, lat []time.Duration) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
}

// BenchmarkDeviceList: the console's device list at 10,000 devices, over
// HTTP with a token: a page of 50 by id, a page sorted by last contact,
// the last page, an id search, and the whole list for comparison.
func BenchmarkDeviceList(b *testing.B) {
	s := benchServer(b, 10000)
	for _, c := range []struct{ name, path string }{
		{"page", "/api/v1/devices?limit=50"},
		{"page-by-last-seen", "/api/v1/devices?limit=50&sort=-last_seen"},
		{"last-page", "/api/v1/devices?limit=50&offset=9950"},
		{"label-filter-page", "/api/v1/devices?limit=50&selector=base=oslo"},
		{"search", "/api/v1/devices?limit=50&q=0042"},
		{"all-10000", "/api/v1/devices"},
	} {
		b.Run(c.name, func(b *testing.B) {
			lat := make([]time.Duration, 0, b.N)
			for b.Loop() {
				t0 := time.Now()
				get(b, s, s.AdminToken, c.path)
				lat = append(lat, time.Since(t0))
			}
			reportQuantiles(b, lat)
		})
	}
}

// BenchmarkLiveMarks is the live stream's work per interval at 10,000
// devices: one read of the store's watermarks, whatever the number of
// consoles open.
func BenchmarkLiveMarks(b *testing.B) {
	s := benchServer(b, 10000)
	ctx := context.Background()
	for b.Loop() {
		if _, err := s.Store().LiveMarks(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLiveFanout: a change (an audit entry) reaching 1 or 10 open
// live streams; per op, from the write to the last stream's message.
func BenchmarkLiveFanout(b *testing.B) {
	for _, n := range []int{1, 10} {
		b.Run(fmt.Sprintf("streams-%d", n), func(b *testing.B) {
			s := benchServer(b, 10000)
			got := make(chan struct{}, 1024)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			for range n {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL()+"/api/v1/events/stream", nil)
				req.Header.Set("Authorization", "Bearer "+s.AdminToken)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				go func() {
					defer resp.Body.Close()
					sc := bufio.NewScanner(resp.Body)
					for sc.Scan() {
						if strings.HasPrefix(sc.Text(), "data: ") && strings.Contains(sc.Text(), `"audit"`) {
							got <- struct{}{}
						}
					}
				}()
			}
			lat := make([]time.Duration, 0, b.N)
			for b.Loop() {
				t0 := time.Now()
				if _, err := s.Store().AddAudit(context.Background(), store.Audit{Time: time.Now(), Actor: "bench", Action: "bench"}); err != nil {
					b.Fatal(err)
				}
				for range n {
					<-got
				}
				lat = append(lat, time.Since(t0))
			}
			reportQuantiles(b, lat)
		})
	}
}
