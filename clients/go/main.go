// A genrpc client in Go. It calls Generate and GenerateStream with the same seed, then a bad
// parameter and a short deadline, and prints what it saw as one JSON object (the test reads it).
// It uses only APIs that grpc-go 1.33 (Debian 12's) already had, so it builds against old and new
// releases alike: grpc.Dial + WithInsecure, not grpc.NewClient + insecure.NewCredentials.
//
//	genrpc-go-client [address] [prompt]
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	genrpcv1 "genrpcclient/genrpcv1"
)

type completion struct {
	Text            string   `json:"text"`
	TokenIDs        []uint32 `json:"token_ids"`
	FinishReason    string   `json:"finish_reason"`
	GeneratedTokens uint32   `json:"generated_tokens"`
	Seed            uint64   `json:"seed"`
	NumMessages     int      `json:"num_messages,omitempty"`
}

type failure struct {
	Code    int    `json:"code"`
	Name    string `json:"name"`
	Details string `json:"details"`
}

func fail(err error) failure {
	s := status.Convert(err)
	return failure{Code: int(s.Code()), Name: s.Code().String(), Details: s.Message()}
}

func main() {
	addr, prompt := "127.0.0.1:50051", "The capital of France is"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	if len(os.Args) > 2 {
		prompt = os.Args[2]
	}
	conn, err := grpc.Dial(addr, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	client := genrpcv1.NewGenerationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// optional fields are pointers: unset means the model's default.
	maxNew, seed, sample := int32(12), uint64(42), true
	config := &genrpcv1.GenerationConfig{MaxNewTokens: &maxNew, Seed: &seed, DoSample: &sample}
	out := map[string]interface{}{}

	reply, err := client.Generate(ctx, &genrpcv1.GenerateRequest{Prompts: []string{prompt}, Config: config})
	if err != nil {
		fmt.Fprintln(os.Stderr, "Generate:", err)
		os.Exit(1)
	}
	c := reply.Completions[0]
	out["unary"] = completion{c.Text, c.TokenIds, c.FinishReason.String(), c.GeneratedTokens, c.Seed, 0}

	stream, err := client.GenerateStream(ctx, &genrpcv1.GenerateStreamRequest{
		Input: &genrpcv1.GenerateStreamRequest_Prompt{Prompt: prompt}, Config: config})
	if err != nil {
		fmt.Fprintln(os.Stderr, "GenerateStream:", err)
		os.Exit(1)
	}
	streamed := completion{TokenIDs: []uint32{}}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "GenerateStream:", err)
			os.Exit(1)
		}
		streamed.NumMessages++
		streamed.Text += msg.Text
		streamed.TokenIDs = append(streamed.TokenIDs, msg.TokenIds...)
		streamed.FinishReason = msg.FinishReason.String()
		streamed.GeneratedTokens = msg.GeneratedTokens
		streamed.Seed = msg.Seed
	}
	out["stream"] = streamed

	topP := float32(2.0)
	_, err = client.Generate(ctx, &genrpcv1.GenerateRequest{
		Prompts: []string{prompt}, Config: &genrpcv1.GenerationConfig{TopP: &topP}})
	out["invalid"] = fail(err)

	long, ignore := int32(2000), true
	short, cancelShort := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancelShort()
	_, err = client.Generate(short, &genrpcv1.GenerateRequest{
		Prompts: []string{prompt}, Config: &genrpcv1.GenerationConfig{MaxNewTokens: &long, IgnoreEos: &ignore}})
	out["deadline"] = fail(err)

	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
}
