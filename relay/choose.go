package relay

import (
	"slices"
	"strings"

	"github.com/relay-project/relay/protocol"
	"github.com/relay-project/relay/store"
)

// accountRequestTypes act on a user's brokerage account. They never go to
// another user's provider, whatever allow_fallback says.
var accountRequestTypes = map[string]bool{
	"get_positions":   true,
	"get_open_orders": true,
	"place_order":     true,
	"modify_order":    true,
	"cancel_order":    true,
	"agent_restart":   true,
}

func isAccountRequest(requestType string) bool {
	return accountRequestTypes[requestType] || strings.HasPrefix(requestType, "execution_")
}

// sortByPreference orders providers as request routing prefers them: the
// highest agent version first (compared as numbers) and, between equal
// versions, the most recently connected.
func sortByPreference(providers []store.Provider) {
	slices.SortStableFunc(providers, func(a, b store.Provider) int {
		if c := protocol.CompareVersions(b.AgentVersion, a.AgentVersion); c != 0 {
			return c
		}
		if c := b.ConnectedAt.Compare(a.ConnectedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
}

// userProviders returns the providers of one user in preference order.
func userProviders(all []store.Provider, userID string) []store.Provider {
	var out []store.Provider
	for _, p := range all {
		if p.UserID == userID {
			out = append(out, p)
		}
	}
	sortByPreference(out)
	return out
}

// chooseProvider picks the provider a request goes to. A user's own
// providers come first; with fallback allowed and none of the user's own
// connected, any user's provider may serve a request that is not an account
// request, preferring those that report TWS connected, then the highest
// version. The second result is false when no provider fits.
func chooseProvider(all []store.Provider, userID, requestType string, allowFallback bool) (store.Provider, bool) {
	if own := userProviders(all, userID); len(own) > 0 {
		return own[0], true
	}
	if !allowFallback || isAccountRequest(requestType) || len(all) == 0 {
		return store.Provider{}, false
	}
	others := slices.Clone(all)
	sortByPreference(others)
	// A stable sort on TWS state keeps the version order within each group.
	slices.SortStableFunc(others, func(a, b store.Provider) int {
		return boolRank(isTrue(b.IBConnected)) - boolRank(isTrue(a.IBConnected))
	})
	return others[0], true
}

func isTrue(b *bool) bool { return b != nil && *b }

func boolRank(b bool) int {
	if b {
		return 1
	}
	return 0
}
