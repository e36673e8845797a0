package store

// userIndex maps a user id to that user's providers in the view, each with
// the replica that holds it, so that UserProviders does not scan the whole
// registry. The Redis store keeps it under its mutex, in step with s.local
// and s.peers, through the methods below.
type userIndex map[string]map[string]string // user id → provider id → replica id

func (x userIndex) add(p Provider, replica string) {
	m := x[p.UserID]
	if m == nil {
		m = make(map[string]string)
		x[p.UserID] = m
	}
	m[p.ID] = replica
}

func (x userIndex) remove(p Provider) {
	m := x[p.UserID]
	delete(m, p.ID)
	if len(m) == 0 {
		delete(x, p.UserID)
	}
}

// putLocalLocked adds or replaces a provider held by this replica.
func (s *Redis) putLocalLocked(p Provider) {
	if old, ok := s.local[p.ID]; ok {
		s.users.remove(old)
	}
	s.local[p.ID] = p
	s.users.add(p, s.cfg.ReplicaID)
}

// deleteLocalLocked removes a provider held by this replica.
func (s *Redis) deleteLocalLocked(id string) {
	if old, ok := s.local[id]; ok {
		s.users.remove(old)
		delete(s.local, id)
	}
}

// putPeerProviderLocked adds or replaces a provider of another replica.
func (s *Redis) putPeerProviderLocked(replica string, peer *peerView, p Provider) {
	if old, ok := peer.providers[p.ID]; ok {
		s.users.remove(old)
	}
	peer.providers[p.ID] = p
	s.users.add(p, replica)
}

// deletePeerProviderLocked removes a provider of another replica.
func (s *Redis) deletePeerProviderLocked(peer *peerView, id string) {
	if old, ok := peer.providers[id]; ok {
		s.users.remove(old)
		delete(peer.providers, id)
	}
}

// setPeerLocked replaces the view of a replica, or drops it when view is nil.
func (s *Redis) setPeerLocked(replica string, view *peerView) {
	if old := s.peers[replica]; old != nil {
		for _, p := range old.providers {
			s.users.remove(p)
		}
	}
	if view == nil {
		delete(s.peers, replica)
		return
	}
	s.peers[replica] = view
	for _, p := range view.providers {
		s.users.add(p, replica)
	}
}
