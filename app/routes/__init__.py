"""HTTP routes. Handlers are thin: parse, authorise, call a service, build the response."""
