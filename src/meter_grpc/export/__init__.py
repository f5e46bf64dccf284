"""Usage export to billing systems: a durable outbox of every counted change, delivered at
least once to each configured sink and deduplicated there by the event's id."""
