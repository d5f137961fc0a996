"""The process runtime: a local or cluster Ray, unwrapping worker errors, process trees and heap trimming."""
