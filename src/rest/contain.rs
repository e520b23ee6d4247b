//! Panic containment around the whole HTTP service: a panic while handling a request (in
//! routing or in its future) answers that request with a 500 OperationOutcome and leaves
//! the server and every other request alone. It wraps the router once, outside it, so a
//! request pays for no boxed clone of a route's service (as `Router::layer` would add).

use std::convert::Infallible;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use futures_util::FutureExt;
use futures_util::future::{CatchUnwind, Either, Map, Ready, ready};

type Answer = fn(std::thread::Result<Result<Response, Infallible>>) -> Result<Response, Infallible>;

#[derive(Clone)]
pub struct Contain<S> {
    inner: S,
}

impl<S> Contain<S> {
    pub fn new(inner: S) -> Contain<S> {
        Contain { inner }
    }
}

impl<S> tower::Service<Request> for Contain<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        Map<CatchUnwind<AssertUnwindSafe<S::Future>>, Answer>,
        Ready<Result<Response, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(future) => Either::Left(AssertUnwindSafe(future).catch_unwind().map(answer)),
            Err(_) => Either::Right(ready(Ok(super::panic_response()))),
        }
    }
}

fn answer(
    result: std::thread::Result<Result<Response, Infallible>>,
) -> Result<Response, Infallible> {
    result.unwrap_or_else(|_| Ok(super::panic_response()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Service;

    /// Panics in `call` (`early`) or in its future.
    #[derive(Clone)]
    struct Panicky {
        early: bool,
    }

    impl tower::Service<Request> for Panicky {
        type Response = Response;
        type Error = Infallible;
        type Future = futures_util::future::BoxFuture<'static, Result<Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request) -> Self::Future {
            assert!(!self.early, "panic in call");
            Box::pin(async move {
                if request.uri().path() == "/boom" {
                    panic!("panic in the future");
                }
                Ok(Response::new(axum::body::Body::empty()))
            })
        }
    }

    fn get(path: &str) -> Request {
        Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_panic_answers_500_and_the_service_goes_on() {
        let mut late = Contain::new(Panicky { early: false });
        let r = late.call(get("/boom")).await.unwrap();
        assert_eq!(r.status(), 500);
        let r = late.call(get("/fine")).await.unwrap();
        assert_eq!(r.status(), 200);
        let mut early = Contain::new(Panicky { early: true });
        let r = early.call(get("/fine")).await.unwrap();
        assert_eq!(r.status(), 500);
    }
}
