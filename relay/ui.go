package relay

import (
	"embed"
	"io/fs"
	"net/http"
	"path"
	"strings"

	"github.com/labstack/echo/v4"
)

// uiFiles is the operator status page: static files with no build step. The
// page reads GET /options/relay/cluster and GET /options/relay/registry.
//
//go:embed ui
var uiFiles embed.FS

// uiSecurityHeaders are set on every file of the status page. The policy
// allows only the page's own scripts, styles and API calls, so that text
// taken from agents cannot load or run anything even if a bug rendered it
// as HTML.
var uiSecurityHeaders = map[string]string{
	"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; " +
		"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
	"X-Content-Type-Options": "nosniff",
	"Referrer-Policy":        "no-referrer",
	// Embedded files carry no modification time, so with no-cache browsers
	// fetch them again on every load and pick up a new relay version's page
	// at once. The three files total about 24 KB.
	"Cache-Control": "no-cache",
}

// uiContentTypes are the content types of the page's files. They are set
// here because http.FileServer takes them from the system's MIME tables,
// which differ between hosts, and browsers reject a script or style sheet
// of another type under X-Content-Type-Options: nosniff.
var uiContentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
}

// registerUI mounts the operator status page at /ui/ and redirects / and /ui
// to it. The page's files need no bearer token, because they contain no data.
// The API calls that the page makes send the token that the operator enters.
func (s *Server) registerUI(e *echo.Echo) {
	root, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		// fs.Sub fails only for an invalid path name, and "ui" is valid.
		panic("relay: status page files: " + err.Error())
	}
	files := http.StripPrefix("/ui", http.FileServer(http.FS(root)))
	serve := func(c echo.Context) error {
		header := c.Response().Header()
		for name, value := range uiSecurityHeaders {
			header.Set(name, value)
		}
		name := c.Request().URL.Path
		if strings.HasSuffix(name, "/") {
			name += "index.html"
		}
		if contentType, ok := uiContentTypes[path.Ext(name)]; ok {
			header.Set(echo.HeaderContentType, contentType)
		}
		files.ServeHTTP(c.Response(), c.Request())
		return nil
	}

	// The redirects use relative locations, so the page also works behind a
	// proxy that serves the relay under a path prefix.
	e.GET("/", func(c echo.Context) error { return c.Redirect(http.StatusFound, "ui/") })
	e.GET("/ui", func(c echo.Context) error { return c.Redirect(http.StatusFound, "ui/") })
	e.GET("/ui/*", serve)
	e.HEAD("/ui/*", serve)
}
