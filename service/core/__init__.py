"""The shared bottom: what every layer above speaks -- settings, the endpoint table, the response
schemas, refusals (the one error body), the metrics and the worker's memory policy. Imports nothing
from service/ but itself."""
