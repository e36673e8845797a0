package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/relay-project/relay/internal/redistest"
)

func TestLoadConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Addr != ":8000" || cfg.RedisURL != "" || cfg.AuthTimeout != 10*time.Second || cfg.StatusTimeout != 5*time.Second {
		t.Errorf("defaults: addr %q, redis %q, auth timeout %v, status timeout %v", cfg.Addr, cfg.RedisURL, cfg.AuthTimeout, cfg.StatusTimeout)
	}
}

func TestLoadConfigReportsEveryProblem(t *testing.T) {
	env := map[string]string{
		"RELAY_AUTH_TIMEOUT":    "ten seconds",
		"RELAY_SEND_QUEUE":      "-1",
		"RELAY_REPLICA_ID":      "a{b}",
		"RELAY_TRUSTED_PROXIES": "10.0.0.0/8, nonsense",
	}
	_, err := loadConfig(func(k string) string { return env[k] })
	if err == nil {
		t.Fatal("invalid configuration accepted")
	}
	for name := range env {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not name %s: %v", name, err)
		}
	}
}

func TestParseNetworks(t *testing.T) {
	nets, err := parseNetworks("10.0.0.0/8, 192.168.1.7 ,::1")
	if err != nil {
		t.Fatal(err)
	}
	if len(nets) != 3 || nets[1].String() != "192.168.1.7/32" || nets[2].String() != "::1/128" {
		t.Errorf("parsed %v", nets)
	}
}

// TestRedisOverTLS connects to a redis-server that listens with TLS only,
// with a certificate from a private CA given by RELAY_REDIS_CA_FILE.
func TestRedisOverTLS(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTestCertificates(t, dir)
	srv := redistest.Start(t, "--tls-port", "0", "--tls-cert-file", certFile, "--tls-key-file", keyFile,
		"--tls-ca-cert-file", caFile, "--tls-auth-clients", "no")

	cfg, _ := loadConfig(func(string) string { return "" })
	cfg.RedisURL = srv.URL()
	cfg.RedisCAFile = caFile
	client, err := newRedisClient(cfg, "tls-test")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if err := redistest.Ping(client); err != nil {
		t.Fatalf("PING over TLS with the private CA: %v", err)
	}

	cfg.RedisCAFile = ""
	untrusted, err := newRedisClient(cfg, "tls-test")
	if err != nil {
		t.Fatal(err)
	}
	defer untrusted.Close()
	if err := redistest.Ping(untrusted); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("PING without the CA: %v, want a certificate error", err)
	}

	cfg.RedisURL = "redis://" + srv.Addr()
	cfg.RedisCAFile = caFile
	if _, err := newRedisClient(cfg, "tls-test"); err == nil {
		t.Error("a CA file with a redis:// URL was accepted")
	}
}

// writeTestCertificates writes a CA and a server certificate for 127.0.0.1
// signed by it, and returns the three PEM file paths.
func writeTestCertificates(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTemplate := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "relay test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	template := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)

	write := func(name, blockType string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: data}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", der), write("server-key.pem", "EC PRIVATE KEY", keyDER)
}

func TestRedisLoggerRateLimited(t *testing.T) {
	var out strings.Builder
	logger := slog.New(slog.NewJSONHandler(&out, nil))
	l := newRedisLogger(logger, time.Hour)
	for i := range 5 {
		l.Printf(nil, "dial failed %d", i)
	}
	if n := strings.Count(out.String(), "\n"); n != 1 {
		t.Fatalf("%d lines logged for 5 repeats within the interval, want 1:\n%s", n, out.String())
	}
	l.last = time.Time{}
	l.Printf(nil, "dial failed again")
	if !strings.Contains(out.String(), `"suppressed_since_last":4`) {
		t.Errorf("the next line does not count the 4 suppressed ones:\n%s", out.String())
	}
}
