#!/bin/sh
# Builds the Go client from protos/genrpc/v1/generation.proto with no Go module proxy: GOPATH mode
# over Debian's Go sources (/usr/share/gocode), or any GOPATH that holds grpc-go and protobuf-go.
# Needs: go, protoc, protoc-gen-go, protoc-gen-go-grpc (clients/go/setup.sh installs them on Debian).
#
#   clients/go/build.sh [output folder]   -> <output folder>/genrpc-go-client
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-$HERE/build}
PKG="$OUT/src/genrpcclient"
MAP="Mgenrpc/v1/generation.proto=genrpcclient/genrpcv1"
rm -rf "$OUT/src" && mkdir -p "$PKG/genrpcv1"
protoc -I "$ROOT/protos" --go_out="$OUT/src" --go_opt="$MAP" --go-grpc_out="$OUT/src" --go-grpc_opt="$MAP" \
  "$ROOT/protos/genrpc/v1/generation.proto"
cp "$HERE/main.go" "$PKG/main.go"
GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$OUT:${GENRPC_GOPATH:-/usr/share/gocode}" GOCACHE="$OUT/cache" \
  go build -o "$OUT/genrpc-go-client" genrpcclient
echo "$OUT/genrpc-go-client"
