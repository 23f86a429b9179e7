// A genrpc client in Go: Generate, then GenerateStream. Build it after generating the stubs
// as README.md shows (package example.com/genrpcclient/genrpcv1).
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	genrpcv1 "example.com/genrpcclient/genrpcv1"
)

func main() {
	addr := "127.0.0.1:50051"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	client := genrpcv1.NewGenerationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	maxNew := int32(32)
	reply, err := client.Generate(ctx, &genrpcv1.GenerateRequest{
		Prompts: []string{"The capital of France is"},
		Config:  &genrpcv1.GenerationConfig{MaxNewTokens: &maxNew},
	})
	if err != nil {
		log.Fatalf("Generate: %v (%s)", status.Code(err), status.Convert(err).Message())
	}
	c := reply.Completions[0]
	fmt.Printf("%q [%s, %d tokens]\n", c.Text, c.FinishReason, c.GeneratedTokens)

	stream, err := client.GenerateStream(ctx, &genrpcv1.GenerateStreamRequest{
		Prompt: "Once upon a time",
		Config: &genrpcv1.GenerationConfig{MaxNewTokens: &maxNew},
	})
	if err != nil {
		log.Fatal(err)
	}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			log.Fatalf("GenerateStream: %v", err)
		}
		fmt.Print(msg.Text)
	}
	fmt.Println()
}
