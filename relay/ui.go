package relay

import "github.com/labstack/echo/v4"

// registerUI mounts the operator status page. It is replaced by the page's own file.
func (s *Server) registerUI(e *echo.Echo) {}
