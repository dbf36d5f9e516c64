"""What the service knows about its own work: metrics, traces, and the record of each request, kept below the
services so that every route that generates or encodes is measured the same way."""
