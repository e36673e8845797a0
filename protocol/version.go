package protocol

import (
	"strconv"
	"strings"
)

// CompareVersions compares two dotted agent versions part by part as numbers,
// so that "1.10.0" is newer than "1.9.0". Missing parts count as zero
// ("1.2" equals "1.2.0"). A part that is not a number, such as "1.2.0rc1",
// counts by its leading digits, and a tie on those digits is broken by
// comparing the rest as text. It returns -1, 0 or +1.
func CompareVersions(a, b string) int {
	as := strings.Split(strings.TrimPrefix(strings.TrimSpace(a), "v"), ".")
	bs := strings.Split(strings.TrimPrefix(strings.TrimSpace(b), "v"), ".")
	for i := 0; i < max(len(as), len(bs)); i++ {
		var ap, bp string
		if i < len(as) {
			ap = as[i]
		}
		if i < len(bs) {
			bp = bs[i]
		}
		if c := comparePart(ap, bp); c != 0 {
			return c
		}
	}
	return 0
}

func comparePart(a, b string) int {
	an, arest := splitNumber(a)
	bn, brest := splitNumber(b)
	switch {
	case an < bn:
		return -1
	case an > bn:
		return 1
	}
	return strings.Compare(arest, brest)
}

// splitNumber splits "12rc1" into 12 and "rc1". A part with no leading digits is 0.
func splitNumber(s string) (uint64, string) {
	end := 0
	for end < len(s) && s[end] >= '0' && s[end] <= '9' {
		end++
	}
	n, err := strconv.ParseUint(s[:end], 10, 64)
	if err != nil {
		n = 0
	}
	return n, s[end:]
}
