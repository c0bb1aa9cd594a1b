// Oracle for fastgate/forms.py: how Go's net/http reads FormValue("model") from a raw HTTP/1.1 request.
//
// Input: one JSON object per line, {"request": "<base64 of a raw request>"}.
// Output: one JSON object per line, in input order:
//
//	read_error       http.ReadRequest's error ("" when the request parsed)
//	form_error       r.ParseForm()'s error: the query and, for urlencoded bodies, the body
//	multipart_error  r.ParseMultipartForm(32<<20)'s error after that (http.ErrNotMultipart when not multipart)
//	value            r.FormValue("model"), what Ollama's transcription handler reads
//	values           r.Form["model"], every value Go collected, in Go's order
//	value_b64, values_b64  the same bytes in base64, since JSON would replace invalid UTF-8
//
// ParseForm runs before ParseMultipartForm so the two errors stay apart; FormValue would run the same two
// steps itself (ParseMultipartForm calls ParseForm first), so the resulting r.Form is the same.
// Standard library only.
//
// The build runs in GOPATH mode, where GODEBUG defaults to an old language version (no 10,000-parameter
// query limit, for one); the directive below gives the defaults of Ollama's go.mod (go 1.26) instead.

//go:debug default=go1.26
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
)

type input struct {
	Request string `json:"request"`
}

type answer struct {
	ReadError      string   `json:"read_error"`
	FormError      string   `json:"form_error"`
	MultipartError string   `json:"multipart_error"`
	Value          string   `json:"value"`
	Values         []string `json:"values"`
	ValueB64       string   `json:"value_b64"`
	ValuesB64      []string `json:"values_b64"`
}

func failed(reason string) answer {
	return answer{ReadError: reason, Values: []string{}, ValuesB64: []string{}}
}

func errorText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func judge(raw []byte) answer {
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
	if err != nil {
		return failed(err.Error())
	}
	defer r.Body.Close()
	a := answer{FormError: errorText(r.ParseForm())}
	a.MultipartError = errorText(r.ParseMultipartForm(32 << 20))
	if r.MultipartForm != nil {
		defer r.MultipartForm.RemoveAll()
	}
	a.Value = r.FormValue("model")
	a.ValueB64 = base64.StdEncoding.EncodeToString([]byte(a.Value))
	a.Values = []string{}
	a.ValuesB64 = []string{}
	for _, v := range r.Form["model"] {
		a.Values = append(a.Values, v)
		a.ValuesB64 = append(a.ValuesB64, base64.StdEncoding.EncodeToString([]byte(v)))
	}
	return a
}

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<30) // requests with big bodies arrive as one long line
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	encoder := json.NewEncoder(out)
	for scanner.Scan() {
		line := bytes.TrimSpace(scanner.Bytes())
		if len(line) == 0 {
			continue
		}
		var in input
		if err := json.Unmarshal(line, &in); err != nil {
			encoder.Encode(failed("bad input line: " + err.Error()))
			continue
		}
		raw, err := base64.StdEncoding.DecodeString(in.Request)
		if err != nil {
			encoder.Encode(failed("bad base64: " + err.Error()))
			continue
		}
		encoder.Encode(judge(raw))
	}
	if err := scanner.Err(); err != nil {
		os.Stderr.WriteString("reading stdin: " + err.Error() + "\n")
		os.Exit(1)
	}
}
