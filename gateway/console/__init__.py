"""The admin console at `/ui`: server-rendered pages over the admin API's store, the registry and the engines."""
