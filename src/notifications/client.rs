//! Graph's `/subscriptions` endpoint: create, renew, delete. One request per call, each under a
//! deadline; errors classified like the delta client's (`graph::classify_failure`).

use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::auth::AccessToken;
use crate::graph::{classify_failure, GraphError, RequestIds};
use crate::net;

/// Subscription responses are small; anything bigger is not one.
const MAX_BODY: usize = 64 * 1024;
/// A page of the subscription list: Graph pages it (about 100 per page).
const MAX_LIST_BODY: usize = 4 * 1024 * 1024;
/// Pages of the subscription list read at most.
const MAX_LIST_PAGES: usize = 50;

/// A subscription as `GET /subscriptions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSubscription {
    pub id: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub notification_url: Option<String>,
}

#[derive(Deserialize)]
struct ListPage {
    value: Vec<ListedSubscription>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
}

/// What calsync asks Graph to subscribe to.
pub struct NewSubscription<'a> {
    pub mailbox: &'a str,
    pub notification_url: &'a str,
    pub lifecycle_url: &'a str,
    pub expires_at: DateTime<Utc>,
    pub client_state: &'a SecretString,
}

/// A subscription as Graph answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionBody {
    id: String,
    expiration_date_time: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Graph no longer has it (expired or removed): create a new one.
    #[error("Graph has no such subscription (HTTP 404) [{0}]")]
    NotFound(RequestIds),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("no answer from Graph within {0:?}")]
    Deadline(Duration),
}

impl SubscriptionError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Graph(e) => e.retry_after(),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct SubscriptionClient {
    http: reqwest::Client,
    base: Url,
    deadline: Duration,
}

impl SubscriptionClient {
    /// `http` carries the connect timeout and total deadline of `graph.*`; `deadline` bounds
    /// each call again from outside, body included.
    pub fn new(http: reqwest::Client, base: Url, deadline: Duration) -> Self {
        Self {
            http,
            base,
            deadline,
        }
    }

    fn url(&self, id: Option<&str>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push("subscriptions");
            if let Some(id) = id {
                segments.push(id);
            }
        }
        url
    }

    /// `POST /subscriptions`: Graph validates the notification URL before it answers 201.
    pub async fn create(
        &self,
        new: &NewSubscription<'_>,
        token: &AccessToken,
    ) -> Result<Subscription, SubscriptionError> {
        let body = serde_json::json!({
            "changeType": "created,updated,deleted",
            "notificationUrl": new.notification_url,
            "lifecycleNotificationUrl": new.lifecycle_url,
            "resource": format!("/users/{}/events", new.mailbox),
            "expirationDateTime": new.expires_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "clientState": new.client_state.expose_secret(),
        });
        let request = self.http.post(self.url(None)).json(&body);
        let answer = self
            .send(request, token, 201, Some(new.client_state), MAX_BODY)
            .await?;
        parse(&answer.0, new.expires_at, answer.1)
    }

    /// `PATCH /subscriptions/{id}` with a new expiry.
    pub async fn renew(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
        token: &AccessToken,
    ) -> Result<Subscription, SubscriptionError> {
        let body = serde_json::json!({
            "expirationDateTime": expires_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        let request = self.http.patch(self.url(Some(id))).json(&body);
        let answer = self.send(request, token, 200, None, MAX_BODY).await?;
        parse(&answer.0, expires_at, answer.1)
    }

    /// `GET /subscriptions`: the app's subscriptions in the token's tenant, every page (a next
    /// link to another host ends the list, like a delta page's).
    pub async fn list(
        &self,
        token: &AccessToken,
    ) -> Result<Vec<ListedSubscription>, SubscriptionError> {
        let mut all = Vec::new();
        let mut url = self.url(None);
        for _ in 0..MAX_LIST_PAGES {
            let request = self.http.get(url.clone());
            let (body, ids) = self.send(request, token, 200, None, MAX_LIST_BODY).await?;
            let page: ListPage = serde_json::from_slice(&body).map_err(|e| {
                SubscriptionError::Graph(GraphError::Malformed {
                    reason: format!("subscription list: {e}"),
                    ids,
                })
            })?;
            all.extend(page.value);
            match page.next_link.as_deref().map(Url::parse) {
                Some(Ok(next)) if next.origin() == self.base.origin() => url = next,
                _ => break,
            }
        }
        Ok(all)
    }

    /// `DELETE /subscriptions/{id}`; one already gone counts as deleted.
    pub async fn delete(&self, id: &str, token: &AccessToken) -> Result<(), SubscriptionError> {
        let request = self.http.delete(self.url(Some(id)));
        match self.send(request, token, 204, None, MAX_BODY).await {
            Ok(_) | Err(SubscriptionError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        token: &AccessToken,
        expected: u16,
        client_state: Option<&SecretString>,
        max_body: usize,
    ) -> Result<(Vec<u8>, RequestIds), SubscriptionError> {
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let call = async {
            let mut ids = RequestIds {
                request_id: None,
                client_request_id: client_request_id.clone(),
            };
            let sent = request
                .header(http::header::AUTHORIZATION, token.bearer_header())
                .header(http::header::ACCEPT, "application/json")
                .header("client-request-id", &client_request_id)
                .send()
                .await;
            let mut response = match sent {
                Ok(r) => r,
                Err(e) => {
                    return Err(SubscriptionError::Graph(GraphError::Transient {
                        reason: net::describe_transport(&e),
                        retry_after: None,
                        ids,
                    }))
                }
            };
            ids.request_id = response
                .headers()
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = net::read_body_limited(&mut response, max_body).await;
            let body = match body {
                // An error message may quote the request (token, clientState) back.
                Ok(b) => {
                    let b = token.redact_from(&b);
                    match client_state {
                        Some(state) => net::redact(&b, state.expose_secret()),
                        None => b,
                    }
                }
                Err(e) => {
                    return Err(SubscriptionError::Graph(GraphError::Transient {
                        reason: e.to_string(),
                        retry_after: None,
                        ids,
                    }))
                }
            };
            if status == expected || (expected != 204 && status == 200) {
                return Ok((body, ids));
            }
            if status == 404 {
                return Err(SubscriptionError::NotFound(ids));
            }
            Err(classify_failure(status, &headers, &body, ids, SystemTime::now()).into())
        };
        tokio::time::timeout(self.deadline, call)
            .await
            .unwrap_or(Err(SubscriptionError::Deadline(self.deadline)))
    }
}

fn parse(
    body: &[u8],
    asked: DateTime<Utc>,
    ids: RequestIds,
) -> Result<Subscription, SubscriptionError> {
    let parsed: SubscriptionBody = serde_json::from_slice(body).map_err(|e| {
        SubscriptionError::Graph(GraphError::Malformed {
            reason: format!("subscription body: {e}"),
            ids,
        })
    })?;
    Ok(Subscription {
        id: parsed.id,
        // Graph may grant less than asked; it says so in the answer.
        expires_at: parsed.expiration_date_time.unwrap_or(asked),
    })
}
