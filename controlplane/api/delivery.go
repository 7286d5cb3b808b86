package api

import (
	"net/http"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/delivery"
)

// DeliveryReport is the body of GET /api/v1/metrics/delivery: the four
// keys, overall and per hardware revision, and the fleet's health over
// the same window beside them.
type DeliveryReport struct {
	delivery.Report
	Health []HealthPoint `json:"health"`
}

// HealthPoint is the fleet's health at one time of the window.
type HealthPoint struct {
	Time       time.Time `json:"time"`
	Devices    int       `json:"devices"`
	Online     int       `json:"online"`
	LowBattery int       `json:"low_battery"`
	// Versions is the number of versions in the fleet (fewer: a fleet
	// more up to date).
	Versions int `json:"versions"`
}

// DefaultDeliveryWindow is the window of the delivery metrics.
const DefaultDeliveryWindow = 28 * 24 * time.Hour

func (a *API) deliveryMetrics(c echo.Context) error {
	now := a.opts.Now()
	from, err := timeParam(c, "from", now.Add(-DefaultDeliveryWindow))
	if err != nil {
		return err
	}
	to, err := timeParam(c, "to", now)
	if err != nil {
		return err
	}
	if !from.Before(to) {
		return badRequest("from must be before to")
	}
	out := DeliveryReport{Report: delivery.Report{From: from, To: to, ByHardware: map[string]delivery.Metrics{}}, Health: []HealthPoint{}}
	ctx := c.Request().Context()
	if a.opts.Delivery != nil {
		in, err := delivery.Load(ctx, a.opts.Delivery, from, to)
		if err != nil {
			return err
		}
		out.Report = delivery.Compute(in)
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
