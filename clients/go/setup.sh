#!/bin/sh
# Installs what clients/go/build.sh needs from Debian's packages when something is missing
# (Debian 12: go 1.19, grpc-go 1.33, protobuf-go 1.28). Exit status 3: not Debian/apt, or no root.
set -eu
# golang-github-golang-protobuf-1-5-dev: grpc-go's codec goes through github.com/golang/protobuf, and only
# its 1.4+ releases understand the messages protoc-gen-go 1.2x generates (1.3 panics on them).
PACKAGES="golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
  protoc-gen-go protoc-gen-go-grpc protobuf-compiler"
GOCODE=/usr/share/gocode/src
if command -v go >/dev/null && command -v protoc >/dev/null && command -v protoc-gen-go >/dev/null \
   && command -v protoc-gen-go-grpc >/dev/null && [ -d $GOCODE/google.golang.org/grpc ] \
   && [ -e $GOCODE/github.com/golang/protobuf/proto/registry.go ]; then
  exit 0
fi
command -v apt-get >/dev/null || { echo "no apt-get: install go, protoc and the Go gRPC plugins by hand" >&2; exit 3; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null && sudo -n true 2>/dev/null || { echo "installing Debian packages needs root" >&2; exit 3; }
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
# a stalled mirror fails a fetch in 30 s and is retried, instead of waiting on the socket
APT="-o Acquire::http::Timeout=30 -o Acquire::Retries=3"
$SUDO apt-get $APT install -y -qq --no-install-recommends $PACKAGES >/dev/null 2>&1 || {
  $SUDO apt-get $APT update -qq >/dev/null && $SUDO apt-get $APT install -y -qq --no-install-recommends $PACKAGES >/dev/null; }
