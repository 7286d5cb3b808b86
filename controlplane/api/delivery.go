package api

import (
	"net/http"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/delivery"
	"github.com/hangarfleet/hangar/controlplane/wire"
)

// DeliveryReport is wire.DeliveryReport.
type DeliveryReport = wire.DeliveryReport

// HealthPoint is wire.HealthPoint.
type HealthPoint = wire.HealthPoint

// DefaultDeliveryWindow is the window of the delivery metrics.
const DefaultDeliveryWindow = 28 * 24 * time.Hour

func (a *API) deliveryMetrics(c echo.Context) error {
	now := a.opts.Now()
	from, err := a.timeParam(c, "from", now.Add(-DefaultDeliveryWindow))
	if err != nil {
		return err
	}
	to, err := a.timeParam(c, "to", now)
	if err != nil {
		return err
	}
	if !from.Before(to) {
		return badRequest("from must be before to")
	}
	out := DeliveryReport{Report: delivery.Report{From: from, To: to, ByHardware: map[string]delivery.Metrics{}}, Health: []HealthPoint{}}
	ctx := c.Request().Context()
	if a.opts.Delivery != nil {
		// The whole history is read: a report is kept a minute, for
		// windows that agree to the minute (several consoles, refreshes).
		key := from.Truncate(time.Minute).String() + "/" + to.Truncate(time.Minute).String()
		a.deliveryMu.Lock()
		cached, ok := a.reports[key]
		a.deliveryMu.Unlock()
		if ok && now.Sub(cached.at) < time.Minute {
			out.Report = cached.rep
		} else {
			in, err := delivery.Load(ctx, a.opts.Delivery, from, to)
			if err != nil {
				return err
			}
			out.Report = delivery.Compute(in)
			a.deliveryMu.Lock()
			if len(a.reports) > 64 {
				clear(a.reports)
			}
			a.reports[key] = deliveryEntry{at: now, rep: out.Report}
			a.deliveryMu.Unlock()
		}
	}
	days := int(to.Sub(from).Hours()/24) + 1
	hs, err := a.opts.Store.FleetHistory(ctx, from, to, max(days, 2))
	if err != nil {
		return err
	}
	for _, h := range hs {
		out.Health = append(out.Health, HealthPoint{Time: h.Time, Devices: h.Devices - h.Revoked, Online: h.Online, LowBattery: h.LowBatt, Versions: len(h.Versions)})
	}
	return c.JSON(http.StatusOK, out)
}

type deliveryEntry struct {
	at  time.Time
	rep delivery.Report
}

type deliveryCache struct {
	deliveryMu sync.Mutex
	reports    map[string]deliveryEntry
}
