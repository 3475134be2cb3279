//! RDS: VirtualService -> RouteConfiguration.
