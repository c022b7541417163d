// A real MinIO admin client (madmin-go, as Debian packages it) against
// Vivian's fake MinIO admin server: tests/minio_admin.rs builds and runs
// it. Usage: madmin-check HOST:PORT ACCESS_KEY SECRET_KEY. Prints one JSON
// object with what each call returned; exits 1 on the first failure.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	madmin "github.com/minio/madmin-go"
)

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", step, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: madmin-check HOST:PORT ACCESS_KEY SECRET_KEY")
		os.Exit(2)
	}
	endpoint, ak, sk := os.Args[1], os.Args[2], os.Args[3]
	ctx := context.Background()
	adm, err := madmin.New(endpoint, ak, sk, false)
	if err != nil {
		fail("new", err)
	}
	out := map[string]interface{}{}

	// add-user: the secret travels encrypted with the root secret.
	if err := adm.AddUser(ctx, "gouser", "gouser-secret-1"); err != nil {
		fail("AddUser", err)
	}
	policy := []byte(`{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::shared/*"]}]}`)
	if err := adm.AddCannedPolicy(ctx, "gopolicy", policy); err != nil {
		fail("AddCannedPolicy", err)
	}
	// This madmin sends no Content-Type: the server answers the legacy way.
	if err := adm.AttachPolicy(ctx, madmin.PolicyAssociationReq{Policies: []string{"gopolicy"}, User: "gouser"}); err != nil {
		fail("AttachPolicy", err)
	}
	if err := adm.UpdateGroupMembers(ctx, madmin.GroupAddRemove{Group: "gogroup", Members: []string{"gouser"}}); err != nil {
		fail("UpdateGroupMembers add", err)
	}
	gd, err := adm.GetGroupDescription(ctx, "gogroup")
	if err != nil {
		fail("GetGroupDescription", err)
	}
	out["group"] = gd
	info, err := adm.GetUserInfo(ctx, "gouser")
	if err != nil {
		fail("GetUserInfo", err)
	}
	out["info"] = info
	// list-users: the answer is encrypted; the client decrypts it.
	users, err := adm.ListUsers(ctx)
	if err != nil {
		fail("ListUsers", err)
	}
	out["users"] = users
	// The new user signs its own request.
	own, err := madmin.New(endpoint, "gouser", "gouser-secret-1", false)
	if err != nil {
		fail("new own", err)
	}
	ownInfo, err := own.GetUserInfo(ctx, "gouser")
	if err != nil {
		fail("GetUserInfo as the user", err)
	}
	out["own_info"] = ownInfo
	// A wrong secret is refused.
	bad, _ := madmin.New(endpoint, ak, "wrong-secret", false)
	if _, err := bad.GetUserInfo(ctx, "gouser"); err != nil {
		out["bad"] = err.Error()
	} else {
		out["bad"] = "accepted"
	}
	if err := adm.DetachPolicy(ctx, madmin.PolicyAssociationReq{Policies: []string{"gopolicy"}, User: "gouser"}); err != nil {
		fail("DetachPolicy", err)
	}
	if err := adm.UpdateGroupMembers(ctx, madmin.GroupAddRemove{Group: "gogroup", Members: []string{"gouser"}, IsRemove: true}); err != nil {
		fail("UpdateGroupMembers remove", err)
	}
	if err := adm.RemoveCannedPolicy(ctx, "gopolicy"); err != nil {
		fail("RemoveCannedPolicy", err)
	}
	if err := adm.RemoveUser(ctx, "gouser"); err != nil {
		fail("RemoveUser", err)
	}
	if _, err := adm.GetUserInfo(ctx, "gouser"); err != nil {
		out["after_remove"] = err.Error()
	}
	b, err := json.Marshal(out)
	if err != nil {
		fail("json", err)
	}
	fmt.Println(string(b))
}
