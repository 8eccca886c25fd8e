"""Arrow Flight transport: ``FlightServerThread`` serves an OptimizerService over Flight
(DoExchange steps, DoPut pushes, DoGet pulls, DoAction for every other RPC)."""

from adamserve.transports.flight.server import FlightServerThread, FlightService

__all__ = ["FlightServerThread", "FlightService"]
