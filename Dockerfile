# syntax=docker/dockerfile:1

# Image of the relay, with the agent simulator beside it.
#
#   docker build --build-arg VERSION=1.2.3 -t relay:1.2.3 .
#   docker run --rm -p 8000:8000 relay:1.2.3
#
# The relay binary is the entrypoint. The simulator runs with
# `--entrypoint /usr/local/bin/agentsim`.

# go.mod asks for Go 1.26.8 or newer, and the golang images build with
# GOTOOLCHAIN=local, so a 1.26 tag older than 1.26.8 fails the build.
ARG GO_VERSION=1.26

# The build stage runs on the build machine's platform and cross-compiles for
# the target platform, so multi-platform builds need no emulation.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS build
ARG TARGETOS
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src

# Download modules in a layer of their own, which changes only with go.mod
# and go.sum.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download

COPY . .
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/ ./cmd/relay ./cmd/agentsim

# distroless/static holds CA certificates (for rediss:// and an https
# API_BASE_URL), tzdata and /etc/passwd, and no shell or package manager.
# The :nonroot tag runs as UID and GID 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/relay /out/agentsim /usr/local/bin/
USER 65532:65532
EXPOSE 8000

# No HEALTHCHECK: the image has no shell, curl or wget to run one, and the
# relay binary has no health probe mode. Probe GET /healthz (liveness) and
# GET /readyz (readiness, 503 while draining) from outside the container:
# Kubernetes probes, or a check on the load balancer in front.
ENTRYPOINT ["/usr/local/bin/relay"]
