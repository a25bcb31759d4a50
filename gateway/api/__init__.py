"""The gateway's HTTP routes, one router per endpoint family; the work behind them is in the serving services."""
