// Oracle for fastgate/gojson.py: how encoding/json (the decoder Ollama uses) reads a request body.
//
// Reads one JSON object per line on stdin and writes one JSON object per line on stdout.
//
//	{"body": "<base64>"}   decode the body as Ollama's handlers do, json.NewDecoder(r).Decode(&req), and
//	                       answer {"error": bool, "error_text": str, "fields": {...}, "offset": int,
//	                       "trailing": bool}: the string fields as read ("" when never assigned, as in
//	                       Go), and whether a non-whitespace byte follows the first value.
//	{"op": "folds"}        answer {"folds": {"a": [runes...], ...}}: for each ASCII letter, the non-ASCII
//	                       runes that bytes.EqualFold (Go's rule for matching keys to field names) says
//	                       equal it, so the Python side can check its own table against Go's.
//
// Standard library only.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"unicode"
	"unicode/utf8"
)

// request has the string fields that name models in Ollama's request types, plus fastgate's api_key.
// Plain strings, as in Ollama: a JSON null leaves a string unchanged but would reset a *string to nil.
type request struct {
	Model       string `json:"model"`
	Name        string `json:"name"`
	From        string `json:"from"`
	Source      string `json:"source"`
	Destination string `json:"destination"`
	APIKey      string `json:"api_key"`
}

type input struct {
	Op   string `json:"op"`
	Body []byte `json:"body"` // base64 in JSON
}

type answer struct {
	Error     bool              `json:"error"`
	ErrorText string            `json:"error_text"`
	Fields    map[string]string `json:"fields"`
	Offset    int64             `json:"offset"`
	Trailing  bool              `json:"trailing"`
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\r' || c == '\n' }

func decode(body []byte) answer {
	var req request
	dec := json.NewDecoder(bytes.NewReader(body))
	err := dec.Decode(&req)
	out := answer{Fields: map[string]string{"model": req.Model, "name": req.Name, "from": req.From,
		"source": req.Source, "destination": req.Destination, "api_key": req.APIKey}}
	if err != nil {
		out.Error = true
		out.ErrorText = err.Error()
	}
	out.Offset = dec.InputOffset()
	if err == nil {
		for _, c := range body[out.Offset:] {
			if !isSpace(c) {
				out.Trailing = true
				break
			}
		}
	}
	return out
}

// folds lists, for each ASCII letter, the other runes (beyond its ASCII case partner) that Go's key
// matching treats as equal to it.
func folds() map[string][]rune {
	out := map[string][]rune{}
	for c := 'a'; c <= 'z'; c++ {
		out[string(c)] = []rune{}
		for r := rune(0x80); r <= unicode.MaxRune; r++ {
			if !utf8.ValidRune(r) {
				continue
			}
			if bytes.EqualFold([]byte(string(r)), []byte(string(c))) {
				out[string(c)] = append(out[string(c)], r)
			}
		}
	}
	return out
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<30) // bodies of many MiB arrive as one line
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	for in.Scan() {
		var item input
		if err := json.Unmarshal(in.Bytes(), &item); err != nil {
			panic(err)
		}
		var err error
		if item.Op == "folds" {
			err = enc.Encode(map[string]any{"folds": folds()})
		} else {
			err = enc.Encode(decode(item.Body))
		}
		if err != nil {
			panic(err)
		}
		// One answer per question at once: a long-running caller (ask_go_one) waits for each line.
		if err := out.Flush(); err != nil {
			panic(err)
		}
	}
	if err := in.Err(); err != nil {
		panic(err)
	}
}
