package io.flomesh.registryconnector.testenv;

import org.springframework.beans.factory.annotation.Value;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.security.config.Customizer;
import org.springframework.security.config.annotation.web.builders.HttpSecurity;
import org.springframework.security.web.SecurityFilterChain;

/**
 * Open by default, as the test environment's shared server must be. With
 * testenv.auth.enabled=true every request needs HTTP basic auth with
 * spring.security.user.name / spring.security.user.password, as a secured production
 * Eureka server does. CSRF protection is off either way: Eureka clients POST and PUT
 * without tokens.
 */
@Configuration
public class SecurityConfig {
    @Bean
    SecurityFilterChain filterChain(HttpSecurity http,
            @Value("${testenv.auth.enabled:false}") boolean authEnabled) throws Exception {
        http.csrf(csrf -> csrf.disable());
        if (authEnabled) {
            http.authorizeHttpRequests(auth -> auth.anyRequest().authenticated())
                .httpBasic(Customizer.withDefaults());
        } else {
            http.authorizeHttpRequests(auth -> auth.anyRequest().permitAll());
        }
        return http.build();
    }
}
