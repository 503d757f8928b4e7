//! Middleware as a function of the request and the rest of the route, in one boxed future per request
//! (beside the one axum's `Route` boxes each layer in: two per layer in all).
//!
//! axum's `middleware::from_fn` does the same job, but each request in flight through it holds, beside
//! the function's own future, a third boxed future for the rest of the route and room for the
//! request's parts its extractors were read from: about 300 bytes and an allocation per layer, kept
//! for as long as the request lives. A long poll lives through its whole wait, and an idle worker's
//! connection has one in flight nearly all the time: 2,000 idle workers, 2,000 of each.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures::FutureExt as _;
use tower::{Layer, Service};

/// What a middleware does around the rest of the route ([`Next`]).
pub trait Middleware: Clone + Send + Sync + 'static {
    /// Answers `request`, calling `next` (or not) on the way.
    fn around<S: Rest>(
        &self,
        request: Request,
        next: Next<S>,
    ) -> impl Future<Output = Response> + Send + 'static;
}

/// The rest of a route, as a middleware sees it.
pub trait Rest:
    Service<Request, Error = Infallible, Response: IntoResponse, Future: Send + 'static>
    + Send
    + 'static
{
}

impl<S> Rest for S where
    S: Service<Request, Error = Infallible, Response: IntoResponse, Future: Send + 'static>
        + Send
        + 'static
{
}

/// The rest of the route, ready to take one request.
pub struct Next<S>(S);

impl<S: Rest> Next<S> {
    /// `service` as the rest of a route, taken as ready (tests: their services always are).
    #[cfg(test)]
    pub fn ready(service: S) -> Next<S> {
        Next(service)
    }

    /// Hands `request` to the rest of the route. Its future is the inner service's own, unboxed:
    /// the service was made ready before this request was taken ([`Around::poll_ready`]).
    pub fn run(mut self, request: Request) -> impl Future<Output = Response> + Send + 'static {
        self.0.call(request).map(|answer| match answer {
            Ok(response) => response.into_response(),
            Err(never) => match never {},
        })
    }
}

/// `middleware` around each route it is laid on.
#[derive(Clone)]
pub struct AroundLayer<M>(pub M);

impl<M: Clone, S> Layer<S> for AroundLayer<M> {
    type Service = Around<M, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Around {
            middleware: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Around<M, S> {
    middleware: M,
    inner: S,
}

impl<M, S> Service<Request> for Around<M, S>
where
    M: Middleware,
    S: Rest + Clone,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service made ready goes with this request; a clone of it stays for the next one
        // (tower's documented way for a service that must move its inner one into a future).
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        Box::pin(self.middleware.around(request, Next(ready)).map(Ok))
    }
}
