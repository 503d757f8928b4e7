//! Set-up through the typed client (`tether-client`), for the tests that drive a server with it.

use tether_client::{
    Agent, Client, CreateAgent, CreateEnvironment, CreateSession, Environment, Session,
};

/// Through `client`: a self-hosted environment named `name`, an agent, and a session of that agent in
/// that environment (which queues one work item).
pub async fn environment_agent_and_session(
    client: &Client,
    name: &str,
) -> (Environment, Agent, Session) {
    let env = client
        .create_environment(&CreateEnvironment::self_hosted(name))
        .await
        .expect("create an environment");
    let agent = client
        .create_agent(&CreateAgent::new(name, "none"))
        .await
        .expect("create an agent");
    let session = client
        .create_session(&CreateSession::new(agent.id.as_str(), env.id.as_str()))
        .await
        .expect("create a session");
    (env, agent, session)
}
