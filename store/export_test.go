package store

import (
	"fmt"
	"sort"
)

// CheckUserIndex reports a difference between the index by user and a scan
// of the view, for tests.
func (s *Redis) CheckUserIndex() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	scanned := map[string][]string{}
	for id, p := range s.local {
		scanned[p.UserID] = append(scanned[p.UserID], s.cfg.ReplicaID+"/"+id)
	}
	for replica, peer := range s.peers {
		for id, p := range peer.providers {
			scanned[p.UserID] = append(scanned[p.UserID], replica+"/"+id)
		}
	}
	indexed := map[string][]string{}
	for user, ids := range s.users {
		for id, replica := range ids {
			indexed[user] = append(indexed[user], replica+"/"+id)
		}
	}
	if len(scanned) != len(indexed) {
		return fmt.Errorf("index has %d users, view %d", len(indexed), len(scanned))
	}
	for user, want := range scanned {
		got := indexed[user]
		sort.Strings(want)
		sort.Strings(got)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("user %s: index %v, view %v", user, got, want)
		}
	}
	return nil
}
