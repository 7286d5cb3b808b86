package server

import (
	"context"
	"crypto/x509"
	"errors"
	"time"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// deviceCAs is the pool device certificates are verified against, when
// the control plane issues them and speaks TLS.
func (s *Server) now() time.Time { return s.opts.Now() }

func (s *Server) deviceCAs() *x509.CertPool {
	if s.opts.DeviceCA == nil || s.opts.TLS == nil {
		return nil
	}
	return s.opts.DeviceCA.Pool()
}

// handle routes device messages: certificate requests here, everything
// else to ingest.
func (s *Server) handle(ctx context.Context, m broker.Message, done func(error)) {
	if m.Kind != proto.KindCSR {
		s.ingest.Handle(ctx, m, done)
		return
	}
	// A certificate request is answered, or refused, once: it is never
	// redelivered (the device asks again later if no answer comes).
	done(nil)
	go s.renew(m)
}

// renew answers a device's certificate request: a new certificate for the
// key in the request, bound to the connection's identity. It publishes
// the grant, or the reason it refused, on the device's command topic.
func (s *Server) renew(m broker.Message) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	log := s.log.With("component", "certs", "device", m.Device)
	req, err := proto.DecodeCertRequest(m.Payload)
	if err != nil {
		s.metrics.Renewals.WithLabelValues("malformed").Inc()
		log.Warn("malformed certificate request", "err", err)
		return
	}
	refuse := func(result, why string) {
		s.metrics.Renewals.WithLabelValues(result).Inc()
		log.Warn("certificate request refused", "reason", why)
		_, _ = s.db.AddAudit(ctx, store.Audit{Time: s.now(), Actor: "device:" + m.Device, Action: "device.cert-refused",
			Target: m.Device, Reason: why})
		s.grant(ctx, m.Device, &proto.CertGrant{Request: req.ID, Error: why})
	}
	if s.opts.DeviceCA == nil {
		refuse("no_ca", "this control plane issues no device certificates")
		return
	}
	if !s.renewals.Allow(m.Device) {
		s.metrics.Renewals.WithLabelValues("throttled").Inc()
		s.metrics.AuthThrottled.WithLabelValues("renewal").Inc()
		log.Warn("certificate requests too frequent; ignored")
		return
	}
	csr, err := devcert.ParseCSR(req.CSR)
	if err != nil {
		refuse("bad_request", err.Error())
		return
	}
	now := s.now()
	der, serial, err := s.opts.DeviceCA.Issue(csr, m.Device, now, s.opts.CertTTL)
	if err != nil {
		refuse("error", err.Error())
		return
	}
	leaf, _ := x509.ParseCertificate(der)
	_, external := s.bus.(*broker.External)
	err = s.db.Renew(ctx, store.Renewal{Device: m.Device, From: m.Serial, Serial: serial, NotAfter: leaf.NotAfter, Now: now,
		Unverified: external})
	switch {
	case errors.Is(err, store.ErrInvalid):
		refuse("stale", "the request came over a connection whose credential no longer speaks for this device")
		return
	case err != nil:
		s.metrics.Renewals.WithLabelValues("error").Inc()
		log.Error("recording a renewed certificate", "err", err)
		return
	}
	from := store.AuthCert
	if m.Serial == "" && !external {
		from = store.AuthPassword
	}
	_, _ = s.db.AddAudit(ctx, store.Audit{Time: now, Actor: "device:" + m.Device, Action: "device.cert-renewed", Target: m.Device,
		Attrs: map[string]string{"serial": serial, "from": from, "not_after": leaf.NotAfter.UTC().Format(time.RFC3339),
			"key": devcert.Fingerprint(csr.PublicKey)}})
	s.metrics.Renewals.WithLabelValues("ok").Inc()
	log.Info("device certificate issued over the device's connection", "serial", serial, "from", from, "not_after", leaf.NotAfter)
	s.grant(ctx, m.Device, &proto.CertGrant{Request: req.ID, Chain: [][]byte{der, s.opts.DeviceCA.Cert.Raw}})
}

func (s *Server) grant(ctx context.Context, device string, g *proto.CertGrant) {
	b, err := proto.Marshal(&proto.Command{ID: "cert-" + g.Request, Kind: proto.CmdCertificate, Issued: s.now().UnixMilli(), Cert: g})
	if err == nil {
		err = s.bus.Publish(ctx, device, proto.KindCmd, b)
	}
	if err != nil {
		s.log.Warn("sending a certificate grant", "device", device, "err", err)
	}
}
