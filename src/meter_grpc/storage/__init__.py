"""Redis storage: key schema, Lua scripts, repositories, the embedded server."""
