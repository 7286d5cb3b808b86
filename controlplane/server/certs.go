package server

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
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
// else to ingest; a password device's hello brings an invitation to move
// to a certificate.
func (s *Server) handle(ctx context.Context, m broker.Message, done func(error)) {
	if m.Kind != proto.KindCSR {
		if m.Kind == proto.KindState && m.Serial == "" && s.deviceCAs() != nil && s.invites.Allow(m.Device) {
			go s.invite(m.Device)
		}
		s.ingest.Handle(ctx, m, done)
		return
	}
	// A certificate request is answered, or refused, once: it is never
	// redelivered (the device asks again later if no answer comes).
	done(nil)
	if !s.renewals.Allow(m.Device) {
		s.metrics.Renewals.WithLabelValues("throttled").Inc()
		s.metrics.AuthThrottled.WithLabelValues("renewal").Inc()
		return
	}
	select {
	case s.renewing <- struct{}{}:
	default:
		s.metrics.Renewals.WithLabelValues("busy").Inc()
		return // the device asks again later
	}
	go func() {
		defer func() { <-s.renewing }()
		s.renew(m)
	}()
}

// invite asks a device that still authenticates with a password to ask
// for a certificate. A device whose agent cannot does nothing with it.
func (s *Server) invite(device string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := s.db.DeviceAuth(ctx, device)
	if err != nil || a.PasswordHash == nil || len(a.Serials) > 0 {
		return
	}
	b, err := proto.Marshal(&proto.Command{ID: fmt.Sprintf("renew-%d", s.now().UnixMilli()), Kind: proto.CmdRenew, Issued: s.now().UnixMilli()})
	if err == nil {
		err = s.bus.Publish(ctx, device, proto.KindCmd, b)
	}
	if err != nil {
		s.log.Debug("inviting a device to a certificate", "device", device, "err", err)
	}
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
		log.Debug("malformed certificate request", "err", err)
		return
	}
	if s.opts.DeviceCA == nil {
		s.metrics.Renewals.WithLabelValues("no_ca").Inc()
		return
	}
	refuse := func(result, why string) {
		s.metrics.Renewals.WithLabelValues(result).Inc()
		log.Warn("certificate request refused", "reason", why)
		_, _ = s.db.AddAudit(ctx, store.Audit{Time: s.now(), Actor: "device:" + m.Device, Action: "device.cert-refused",
			Target: m.Device, Reason: why})
		s.grant(ctx, m.Device, &proto.CertGrant{Request: req.ID, Error: why})
	}
	csr, err := devcert.ParseCSR(req.CSR)
	if err != nil {
		refuse("bad_request", err.Error())
		return
	}
	from := m.Serial
	if len(req.Cert) > 0 {
		// The device proves it holds its current certificate: needed
		// where the broker does not say which one the connection used.
		serial, err := s.proveCurrent(m.Device, req)
		switch {
		case err != nil:
			refuse("stale", err.Error())
			return
		case m.Serial != "" && serial != m.Serial:
			refuse("stale", "the request names a certificate other than the connection's")
			return
		}
		from = serial
	}
	now := s.now()
	der, serial, err := s.opts.DeviceCA.Issue(csr, m.Device, now, s.opts.CertTTL)
	if err != nil {
		refuse("error", err.Error())
		return
	}
	leaf, _ := x509.ParseCertificate(der)
	key := devcert.Fingerprint(csr.PublicKey)
	err = s.db.Renew(ctx, store.Renewal{Device: m.Device, From: from, Serial: serial, Key: key, NotAfter: leaf.NotAfter, Now: now})
	switch {
	case errors.Is(err, store.ErrInvalid):
		refuse("stale", "the request came over a connection whose credential no longer speaks for this device")
		return
	case err != nil:
		s.metrics.Renewals.WithLabelValues("error").Inc()
		log.Error("recording a renewed certificate", "err", err)
		return
	}
	fromWhat := store.AuthCert
	if from == "" {
		fromWhat = store.AuthPassword
	}
	_, _ = s.db.AddAudit(ctx, store.Audit{Time: now, Actor: "device:" + m.Device, Action: "device.cert-renewed", Target: m.Device,
		Attrs: map[string]string{"serial": serial, "from": fromWhat, "not_after": leaf.NotAfter.UTC().Format(time.RFC3339), "key": key}})
	s.metrics.Renewals.WithLabelValues("ok").Inc()
	log.Info("device certificate issued over the device's connection", "serial", serial, "from", fromWhat, "not_after", leaf.NotAfter)
	s.grant(ctx, m.Device, &proto.CertGrant{Request: req.ID, Chain: [][]byte{der, s.opts.DeviceCA.Cert.Raw}})
}

// proveCurrent checks a request's proof of its current certificate: one of
// the device CA's, for this device, valid now, whose key signed the new
// request. It returns the certificate's serial (the store decides whether
// it is still the device's).
func (s *Server) proveCurrent(device string, req proto.CertRequest) (string, error) {
	leaf, err := x509.ParseCertificate(req.Cert)
	if err != nil {
		return "", fmt.Errorf("current certificate: %v", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.opts.DeviceCA.Pool(), CurrentTime: s.now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return "", fmt.Errorf("current certificate: %v", err)
	}
	if id, err := devcert.DeviceID(leaf); err != nil || id != device {
		return "", errors.New("current certificate is not this device's")
	}
	if err := devcert.VerifyRenewal(leaf.PublicKey, proto.RenewalSigned(req.CSR), req.Sig); err != nil {
		return "", err
	}
	return devcert.SerialString(leaf.SerialNumber), nil
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
